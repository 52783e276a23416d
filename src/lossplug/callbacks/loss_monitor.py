"""LossMonitor: exact cross-entropy, perplexity, accuracy and entropy, logged from Lightning."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lossplug.callbacks._compat import (
    OffTheTrainingClock,
    define_wandb_metrics,
    gather_names,
    is_last_epoch,
    rank_reduce,
)
from lossplug.monitoring.handoff import models_with_stats, pop_token_stats
from lossplug.monitoring.keys import METRIC_NAMES, STAGES, check_metric_names
from lossplug.monitoring.slices import check_slice_by, slice_labels
from lossplug.monitoring.tracker import LossTracker
from lossplug.ops._dispatch import BACKENDS, check_backend
from lossplug.ops._spec import LossSpec
from lossplug.ops.stats import TokenStats

__all__ = ["LossMonitor"]

Extract = Callable[[Any, Any], "TokenStats | tuple[torch.Tensor, torch.Tensor] | None"]


class LossMonitor(OffTheTrainingClock):
    """Log exact model-centric metrics of a language-model fine-tune at optimizer steps.

    Every micro-batch's token statistics are summed on the device (no host synchronisation); at
    every ``log_every_n_steps``-th optimizer step the sums are reduced across ranks once and the
    window since the last log is logged: ``train/cross_entropy``, ``train/perplexity``,
    ``train/token_accuracy``, ``train/entropy``, ``train/tokens`` (cumulative) and
    ``train/tokens_per_sec``, at the trainer's global step. Each validation run logs one aggregate
    under ``val/…`` that ``ModelCheckpoint``/``EarlyStopping`` can monitor
    (``monitor="val/perplexity"``); the train epoch aggregate is logged as ``train/<name>_epoch``.

    Where the numbers come from, cheapest first: a :class:`~lossplug.TokenStats` that
    ``training_step``/``validation_step`` returns under ``"stats"`` (no extra work: the loss
    computed them), else ``"logits"`` and ``"labels"`` (the fused op runs forward-only), else the
    statistics of a Hugging Face model in the module patched by
    :func:`lossplug.integrations.transformers.patch_causal_lm` (no extra work either), else
    ``extract(outputs, batch)``, which returns a ``TokenStats`` or ``(logits, labels)``.

    Args:
        log_every_n_steps: log every this many optimizer steps (default: the trainer's).
        metrics: which of ``cross_entropy``, ``perplexity``, ``token_accuracy``, ``entropy``.
        train_prefix: prefix of the training keys.
        val_prefix: prefix of the validation keys.
        prog_bar: show the perplexity on the progress bar.
        log_epoch: also log the aggregate of each training epoch.
        stages: ``"train"`` and/or ``"val"``.
        extract: fallback ``extract(outputs, batch)`` for modules that return neither.
        ignore_index: for the ``logits``/``labels`` form, as in :func:`lossplug.cross_entropy`.
        shift: for the ``logits``/``labels`` form (labels not yet shifted: causal LM).
        softcap: for the ``logits``/``labels`` form.
        backend: for the ``logits``/``labels`` form.
        check_loss: for the ``logits``/``labels`` and ``extract`` forms, compare the ``loss`` the
            step returned with the monitor's own cross-entropy over the first logged windows (on
            the device; read when the window is logged) and warn once, with the likely cause,
            when they disagree beyond rounding: e.g. Hugging Face-style labels (equal to
            ``input_ids``) without ``shift=True``. Turn it off for a loss that is meant to differ
            (label smoothing, z-loss, a loss that is not this cross-entropy).
        slice_by: also log every validation value per slice of the data, as
            ``val/<metric>/<slice>`` (and ``val/tokens/<slice>``) beside the overall
            ``val/<metric>``: the name of a key of a dict batch holding one label per sequence
            (strings or ints, e.g. the data source), or a function ``batch -> labels``. The values
            are exact and token-weighted like the overall one (the slices' sums add up to it),
            summed over ranks (slices seen on some ranks only included). Per-sequence statistics
            come from the same pass: from ``logits``/``labels``, from a patched Hugging Face
            model, or from a ``stats`` computed with ``per_sequence_stats=True``.

    Example:
        >>> import lossplug
        >>> monitor = lossplug.LossMonitor(log_every_n_steps=10, metrics=("perplexity",))
        >>> monitor.keys("train")
        ['train/perplexity', 'train/tokens', 'train/tokens_per_sec']
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int | None = None,
        metrics: Sequence[str] = METRIC_NAMES,
        train_prefix: str = "train/",
        val_prefix: str = "val/",
        prog_bar: bool = True,
        log_epoch: bool = True,
        stages: Sequence[str] = STAGES,
        extract: Extract | None = None,
        ignore_index: int = -100,
        shift: bool = False,
        softcap: float | None = None,
        backend: str = "auto",
        check_loss: bool = True,
        slice_by: str | Callable[[Any], Any] | None = None,
    ) -> None:
        # every argument is checked here, not at the first step of a long job
        if log_every_n_steps is not None:
            log_every_n_steps = _as_int("log_every_n_steps", log_every_n_steps)
            if log_every_n_steps < 1:
                raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps!r}")
        metrics = check_metric_names(metrics)
        for name, prefix in (("train_prefix", train_prefix), ("val_prefix", val_prefix)):
            if not isinstance(prefix, str):
                raise TypeError(f"{name} must be a str, got {prefix!r}")
        if train_prefix == val_prefix:
            raise ValueError(f"train_prefix and val_prefix must differ, both are {train_prefix!r}")
        stages = _names("stages", stages, STAGES)
        if not stages:
            raise ValueError(f"stages must name at least one of {STAGES}, got {stages!r}")
        if extract is not None and not callable(extract):
            raise TypeError(f"extract must be callable(outputs, batch), got {extract!r}")
        # the options of the logits/labels form; the monitor reads the sums, never the loss
        spec = LossSpec.validated(
            ignore_index=ignore_index, reduction="sum", softcap=softcap, shift=shift
        )
        for name, flag in (
            ("prog_bar", prog_bar),
            ("log_epoch", log_epoch),
            ("check_loss", check_loss),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        check_slice_by(slice_by)
        if slice_by is not None and "val" not in stages:
            raise ValueError(
                f"slice_by splits the validation metrics, but stages={stages!r} has no 'val'"
            )
        if not isinstance(backend, str):
            raise TypeError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_backend(backend)
        self.log_every_n_steps = log_every_n_steps
        self.metrics = metrics
        self.train_prefix = train_prefix
        self.val_prefix = val_prefix
        self.prog_bar = prog_bar
        self.log_epoch = log_epoch
        self.stages = stages
        self.extract = extract
        self.spec = spec
        self.backend = backend
        self.check_loss = check_loss
        self.slice_by = slice_by
        self.tracker = LossTracker(
            metrics=metrics,
            train_prefix=train_prefix,
            val_prefix=val_prefix,
            log_epoch=log_epoch,
            slice_by=slice_by,
            check_loss=check_loss,
            spec=spec,
            owner="LossMonitor",
            stages=stages,
        )
        self._warned_test = False
        self._seen_step = 0
        self._trainer: Any = None
        self._patched: list[Any] | None = None  # models patched by patch_causal_lm, found lazily
        #: ``(step, values)`` of the last validation logged straight to the loggers during fit:
        #: the exact floats, which KPIMonitor's link table pairs with the KPIs of that step
        self.logged_val: tuple[int, dict[str, float]] | None = None

    @property
    def state_key(self) -> str:
        # two monitors with different prefixes (two datasets) keep their own state
        return self._generate_state_key(train_prefix=self.train_prefix, val_prefix=self.val_prefix)

    @property
    def _legacy_state_key(self) -> Any:
        # earlier checkpoints keyed the state by the class name alone: a monitor with the default
        # prefixes, the only kind that could resume then, takes it back
        if (self.train_prefix, self.val_prefix) == ("train/", "val/"):
            return type(self).__qualname__
        return self.state_key

    @property
    def op_kwargs(self) -> dict[str, Any]:
        """``ignore_index``, ``shift`` and ``softcap`` of the ``logits``/``labels`` form."""
        spec = self.spec
        return {"ignore_index": spec.ignore_index, "shift": spec.shift, "softcap": spec.softcap}

    # ----------------------------------------------------------------------------------- keys
    def keys(self, stage: str) -> list[str]:
        """The keys this monitor logs for ``stage`` (``"train"`` or ``"val"``)."""
        return self.tracker.keys(stage)

    def slice_keys(self, slice_name: str) -> list[str]:
        """The validation keys this monitor logs for one slice (``slice_by``)."""
        return self.tracker.slice_keys(slice_name)

    # ---------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if stage == "validate" and trainer.is_global_zero:  # trainer.validate(): no fit start
            self._define_wandb_metrics(trainer)

    @override
    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._warned_test:
            self._warned_test = True
            warnings.warn(
                "LossMonitor monitors training and validation only: trainer.test() logs nothing "
                "from it. For exact values over a test set, run trainer.validate(model, "
                "test_loader) (logged as val/...), or update a lossplug.metrics metric in "
                "test_step",
                UserWarning,
                stacklevel=2,
            )

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:
            self._define_wandb_metrics(trainer)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen_step = trainer.global_step
        self.tracker.start_training()
        self._patched = None

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "train" not in self.stages:
            return
        # Lightning hands back the loss divided by the accumulation count (automatic optimisation)
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        stats = self._stats_from(outputs, batch, pl_module, "training_step", loss_scale=scale)
        if stats is not None:
            self.tracker.add_train(stats)
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation window
            return
        self._seen_step = step
        every = self.log_every_n_steps or max(int(trainer.log_every_n_steps or 1), 1)
        # the last step of fit logs the window it ends, whole or not: nothing goes unlogged
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if (step % every == 0 or last) and step > self.tracker.last_logged_step:
            self._log_train_window(trainer, pl_module, step)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "train" not in self.stages:
            return
        # for epochs shorter than a logging window
        self.tracker.finish_check("train", is_rank_zero=trainer.is_global_zero)
        if is_last_epoch(trainer) and trainer.global_step > self.tracker.last_logged_step:
            self._log_train_window(trainer, pl_module, trainer.global_step)
        if self.log_epoch:
            metrics = self.tracker.read_epoch(rank_reduce(trainer))
            self._emit(trainer, pl_module, metrics, trainer.global_step, prog_bar=False)

    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.tracker.reset_val()
        self._patched = None

    @override
    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if "val" not in self.stages:
            return
        # the sanity check's batches are read but not counted: a validation_step that returns
        # no statistics, or a batch without slice labels, fails there, at the start of fit, not
        # after the first validation interval
        sanity = trainer.sanity_checking
        per_sequence = self.slice_by is not None
        stats = self._stats_from(
            outputs,
            batch,
            pl_module,
            "validation_step",
            per_sequence=per_sequence,
            check=not sanity,
        )
        if stats is None:
            return
        labels = slice_labels(self.slice_by, batch, stats.shape) if per_sequence else None
        if not sanity:
            self.tracker.add_val(stats, labels)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "val" not in self.stages or trainer.sanity_checking:
            self.tracker.reset_val()
            return
        metrics = self.tracker.read_val(
            rank_reduce(trainer), gather_names(trainer), is_rank_zero=trainer.is_global_zero
        )
        if self.slice_by is not None and trainer.is_global_zero:
            self._define_slice_metrics(trainer)
        self._emit(trainer, pl_module, metrics, trainer.global_step, prog_bar=self.prog_bar)
        if trainer.state.fn != "validate":  # trainer.validate() logs them through pl_module.log
            self.logged_val = (trainer.global_step, dict(metrics))

    @override
    def state_dict(self) -> dict[str, Any]:
        # Sums are reduced over ranks here (Lightning builds the checkpoint on every rank): the
        # file then holds the global partial window, which rank 0 alone takes back on resume.
        reduce = rank_reduce(self._trainer) if self._trainer is not None else None
        return self.tracker.state_dict(reduce)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank_zero = self._trainer is None or self._trainer.global_rank == 0
        self.tracker.load_state_dict(state_dict, is_rank_zero=rank_zero)

    # -------------------------------------------------------------------------------- helpers
    def _define_slice_metrics(self, trainer: Any) -> None:
        summaries = self.tracker.new_summaries(self.tracker.seen_slice_keys())
        if summaries:
            define_wandb_metrics(trainer, summaries)

    def _log_train_window(self, trainer: Any, pl_module: Any, step: int) -> None:
        metrics = self.tracker.read_window(
            rank_reduce(trainer), is_rank_zero=trainer.is_global_zero
        )
        self._emit(trainer, pl_module, metrics, step, prog_bar=self.prog_bar)
        self.tracker.last_logged_step = step

    def _emit(
        self, trainer: Any, pl_module: Any, metrics: dict[str, float], step: int, prog_bar: bool
    ) -> None:
        if not metrics:
            return
        # trainer.validate() returns what goes to its loggers through pl_module.log: the values
        # go that way there (once), and straight to the loggers during fit
        standalone = trainer.state.fn == "validate"
        if trainer.is_global_zero and not standalone:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        # The same values on every rank, for ModelCheckpoint/EarlyStopping, the progress bar and
        # KPIs (train/tokens). Each pl_module.log moves the logged result to the device, so rates
        # stay logger-only; CPU tensors, because Lightning reads progress-bar values with .item()
        # at every batch.
        for key, value in metrics.items():
            if key.endswith("tokens_per_sec"):
                continue
            pl_module.log(
                key,
                torch.tensor(float(value)),
                logger=standalone,
                prog_bar=prog_bar and key.endswith("perplexity"),
                sync_dist=False,
                rank_zero_only=False,
            )

    def _define_wandb_metrics(self, trainer: Any) -> None:
        define_wandb_metrics(trainer, self.tracker.summaries(self.stages))

    def _stats_from(
        self,
        outputs: Any,
        batch: Any,
        pl_module: Any,
        hook: str,
        loss_scale: float = 1.0,
        *,
        per_sequence: bool = False,
        check: bool = True,
    ) -> TokenStats | None:
        # taken at every batch, used or not, so a stale value can never be logged later
        from_patched = self._pop_patched_stats(pl_module, per_sequence)
        stage = "train" if hook == "training_step" else "val"
        # the loss the step trained on, to check against the monitor's own numbers
        loss = outputs.get("loss") if check and isinstance(outputs, Mapping) else None
        if isinstance(outputs, Mapping):
            stats = outputs.get("stats")
            if isinstance(stats, TokenStats):
                if per_sequence and stats.shape == () and from_patched is not None:
                    return from_patched  # the same pass, one sum per sequence
                return self._per_sequence(stats, hook) if per_sequence else stats.sum()
            if "logits" in outputs and "labels" in outputs:
                logits, labels = outputs["logits"], outputs["labels"]
                return self._score(logits, labels, stage, loss, loss_scale, per_sequence)
        if from_patched is not None:
            return from_patched
        if self.extract is not None:
            got = self.extract(outputs, batch)
            if got is None or isinstance(got, TokenStats):
                if per_sequence:
                    return self._per_sequence(got, hook)
                return None if got is None else got.sum()
            if isinstance(got, tuple) and len(got) == 2:
                return self._score(*got, stage, loss, loss_scale, per_sequence)
            raise TypeError(
                f"LossMonitor's extract must return a TokenStats, (logits, labels) or None; "
                f"got {type(got).__name__}"
            )
        kind = (
            type(outputs).__name__ if not isinstance(outputs, Mapping) else f"keys {list(outputs)}"
        )
        raise ValueError(
            f"LossMonitor found no token statistics in what {hook} returned ({kind}). Return "
            "{'loss': loss, 'stats': stats} with `loss, stats = lossplug.cross_entropy(..., "
            "return_stats=True)`, or {'loss': loss, 'logits': logits, 'labels': labels}, or pass "
            "LossMonitor(extract=fn) with fn(outputs, batch) -> TokenStats"
            + (
                " (or stages=('train',) if validation_step returns nothing)"
                if hook[0] == "v"
                else ""
            )
        )

    def _score(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        stage: str,
        loss: Any,
        loss_scale: float,
        per_sequence: bool,
    ) -> TokenStats:
        return self.tracker.score(
            logits,
            labels,
            stage,
            loss=loss,
            loss_scale=loss_scale,
            backend=self.backend,
            per_sequence=per_sequence,
        )

    @staticmethod
    def _per_sequence(stats: TokenStats | None, hook: str) -> TokenStats | None:
        """``stats`` if they hold one sum per sequence; an error naming the fix otherwise."""
        if stats is None or stats.shape != ():
            return stats
        raise ValueError(
            f"LossMonitor(slice_by=...) needs one statistic per sequence, but {hook} gave the "
            "TokenStats of the whole batch (0-d sums), which cannot be split by slice. Compute "
            "them with `lossplug.cross_entropy(..., return_stats=True, per_sequence_stats=True)` "
            "(the same pass; the loss is unchanged), or return {'logits': ..., 'labels': ...}"
        )

    def _pop_patched_stats(self, pl_module: Any, per_sequence: bool) -> TokenStats | None:
        """The statistics that models patched by ``patch_causal_lm`` computed with their loss."""
        if self._patched is None:  # found once per stage, not walked at every batch
            self._patched = models_with_stats(pl_module)
        return pop_token_stats(self._patched, per_sequence=per_sequence)


def _as_int(name: str, value: Any) -> int:
    # any integer (a NumPy one from a config too), never a bool or a float that happens to be whole
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _names(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` as a tuple of names from ``allowed``; a lone string is refused (it would be
    read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of names from {allowed}, got {value!r}")
    names = tuple(value)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{name} must be names from {allowed}, got {unknown[0]!r} in {names!r}")
    return names
