"""LossMonitor: exact cross-entropy, perplexity, accuracy and entropy, logged from Lightning."""

from __future__ import annotations

import dataclasses
import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lossplug.callbacks._accumulator import (
    METRIC_NAMES,
    SUMMARIES,
    LossCheck,
    LossComparison,
    SliceAccumulator,
    StatsAccumulator,
    check_slice_by,
    other_shift_nll,
    slice_labels,
)
from lossplug.callbacks._compat import CALLBACK_BASES, define_wandb_metrics
from lossplug.integrations.transformers import patched_models, pop_token_stats
from lossplug.ops._dispatch import BACKENDS, check_backend
from lossplug.ops._spec import LossSpec
from lossplug.ops.cross_entropy import _cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = ["LossMonitor"]

Extract = Callable[[Any, Any], "TokenStats | tuple[torch.Tensor, torch.Tensor] | None"]
SliceBy = "str | Callable[[Any], Any]"
_STAGES = ("train", "val")
# totals and counters summarise as their last value: their max is the same number and "best"
# would mean nothing for them
# A "mean" loss and the monitor's NLL of the same logits agree to float32 rounding; a bf16 loss
# is rounded to 8 bits (0.4 %), so 2 % never trips on correct bf16 runs while a wrong `shift` on
# a model that predicts anything is off by far more (tens of percent).
_LOSS_RTOL, _LOSS_ATOL = 0.02, 1e-3
# The check is on the first windows only: a wrong setup shows from the start, and later a loss
# with label smoothing drifts away from the cross-entropy as the model sharpens.
_CHECKED_WINDOWS = {"train": 3, "val": 1}


class LossMonitor(*CALLBACK_BASES):
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
        stages: Sequence[str] = _STAGES,
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
        metrics = _names("metrics", metrics, METRIC_NAMES)
        if not metrics or len(set(metrics)) != len(metrics):
            raise ValueError(
                f"metrics must be a non-empty subset of {METRIC_NAMES} without repeats, "
                f"got {metrics!r}"
            )
        for name, prefix in (("train_prefix", train_prefix), ("val_prefix", val_prefix)):
            if not isinstance(prefix, str):
                raise TypeError(f"{name} must be a str, got {prefix!r}")
        if train_prefix == val_prefix:
            raise ValueError(f"train_prefix and val_prefix must differ, both are {train_prefix!r}")
        stages = _names("stages", stages, _STAGES)
        if not stages:
            raise ValueError(f"stages must name at least one of {_STAGES}, got {stages!r}")
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

        self._window = StatsAccumulator()
        self._epoch = StatsAccumulator()
        self._val = StatsAccumulator()
        self._val_slices = SliceAccumulator()
        self._slice_keys_declared: set[str] = set()
        self._slices_seen: list[str] = []  # every slice logged so far, kept across a resume
        self._tokens_total = 0
        self._last_logged_step = -1
        self._warned_test = False
        self._seen_step = 0
        self._window_started = time.perf_counter()
        self._trainer: Any = None
        self._patched: list[Any] | None = None  # models patched by patch_causal_lm, found lazily
        self._checks = {stage: LossCheck() for stage in _STAGES}
        self._windows_to_check = dict(_CHECKED_WINDOWS)

    @property
    def op_kwargs(self) -> dict[str, Any]:
        """``ignore_index``, ``shift`` and ``softcap`` of the ``logits``/``labels`` form."""
        spec = self.spec
        return {"ignore_index": spec.ignore_index, "shift": spec.shift, "softcap": spec.softcap}

    # ----------------------------------------------------------------------------------- keys
    def keys(self, stage: str) -> list[str]:
        """The keys this monitor logs for ``stage`` (``"train"`` or ``"val"``)."""
        prefix = self.train_prefix if stage == "train" else self.val_prefix
        keys = [f"{prefix}{name}" for name in self.metrics] + [f"{prefix}tokens"]
        if stage == "train":
            keys.append(f"{prefix}tokens_per_sec")
        return keys

    def slice_keys(self, slice_name: str) -> list[str]:
        """The validation keys this monitor logs for one slice (``slice_by``)."""
        return [f"{key}/{slice_name}" for key in self.keys("val")]

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
        if trainer.is_global_zero:
            self._define_wandb_metrics(trainer)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen_step = trainer.global_step
        self._window_started = time.perf_counter()
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
            self._window.add(stats)
            if self.log_epoch:
                self._epoch.add(stats)
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation window
            return
        self._seen_step = step
        every = self.log_every_n_steps or max(int(trainer.log_every_n_steps or 1), 1)
        # the last step of fit logs the window it ends, whole or not: nothing goes unlogged
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if (step % every == 0 or last) and step > self._last_logged_step:
            self._log_train_window(trainer, pl_module, step)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "train" in self.stages:
            self._finish_check(trainer, "train")  # for epochs shorter than a logging window
            if _last_epoch(trainer) and trainer.global_step > self._last_logged_step:
                self._log_train_window(trainer, pl_module, trainer.global_step)
        if "train" not in self.stages or not self.log_epoch:
            return
        values = self._epoch.read(self._reduce(trainer))
        self._epoch.reset()
        metrics = {f"{self.train_prefix}{n}_epoch": values[n] for n in self.metrics if n in values}
        self._emit(trainer, pl_module, metrics, trainer.global_step, prog_bar=False)

    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._val.reset()
        self._val_slices.reset()
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
        if self.slice_by is None:
            sanity = trainer.sanity_checking
            stats = self._stats_from(outputs, batch, pl_module, "validation_step", check=not sanity)
            if stats is not None and not sanity:
                self._val.add(stats)
            return
        stats = self._stats_from(
            outputs,
            batch,
            pl_module,
            "validation_step",
            per_sequence=True,
            check=not trainer.sanity_checking,
        )
        if stats is None:
            return
        labels = slice_labels(self.slice_by, batch, stats.shape)
        if not trainer.sanity_checking:
            self._val.add(stats.sum())
            self._val_slices.add(stats, labels)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "val" not in self.stages or trainer.sanity_checking:
            self._val.reset()
            self._val_slices.reset()
            return
        values = self._val.read(self._reduce(trainer))
        self._val.reset()
        self._finish_check(trainer, "val")
        metrics = {f"{self.val_prefix}{n}": values[n] for n in self.metrics if n in values}
        metrics[f"{self.val_prefix}tokens"] = values["tokens"]
        if self.slice_by is not None:
            metrics.update(self._read_slices(trainer))
        self._emit(trainer, pl_module, metrics, trainer.global_step, prog_bar=self.prog_bar)

    @override
    def state_dict(self) -> dict[str, Any]:
        # Sums are reduced over ranks here (Lightning builds the checkpoint on every rank): the
        # file then holds the global partial window, which rank 0 alone takes back on resume.
        reduce = self._reduce(self._trainer) if self._trainer is not None else None
        return {
            "version": 1,
            "tokens_total": self._tokens_total,
            "last_logged_step": self._last_logged_step,
            "window": self._reduced_state(self._window, reduce),
            "epoch": self._reduced_state(self._epoch, reduce),
            "slices_seen": list(self._slices_seen),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tokens_total = int(state_dict["tokens_total"])
        self._last_logged_step = int(state_dict["last_logged_step"])
        self._slices_seen = [str(name) for name in state_dict.get("slices_seen", [])]
        rank_zero = self._trainer is None or self._trainer.global_rank == 0
        for acc, key in ((self._window, "window"), (self._epoch, "epoch")):
            acc.load(state_dict[key] if rank_zero else None)

    # -------------------------------------------------------------------------------- helpers
    def _read_slices(self, trainer: Any) -> dict[str, float]:
        """``val/<metric>/<slice>`` of every slice seen on any rank (a collective)."""
        per_slice = self._val_slices.read(self._reduce(trainer), _gather_names(trainer))
        self._val_slices.reset()
        metrics: dict[str, float] = {}
        for name, values in per_slice.items():
            for metric in (*self.metrics, "tokens"):
                if metric in values:
                    metrics[f"{self.val_prefix}{metric}/{name}"] = values[metric]
            if name not in self._slices_seen:
                self._slices_seen.append(name)
        if trainer.is_global_zero:
            self._define_slice_metrics(trainer, self._slices_seen)
        return metrics

    def _define_slice_metrics(self, trainer: Any, names: Sequence[str]) -> None:
        summaries = {}
        for name in names:
            for key in self.slice_keys(name):
                if key not in self._slice_keys_declared:
                    metric = key[len(self.val_prefix) :].split("/", 1)[0]
                    summaries[key] = SUMMARIES.get(metric)
                    self._slice_keys_declared.add(key)
        if summaries:
            define_wandb_metrics(trainer, summaries)

    def _log_train_window(self, trainer: Any, pl_module: Any, step: int) -> None:
        values = self._window.read(self._reduce(trainer))
        self._window.reset()
        self._finish_check(trainer, "train")
        now = time.perf_counter()
        seconds, self._window_started = now - self._window_started, now
        self._tokens_total += int(values["tokens"])
        metrics = {f"{self.train_prefix}{n}": values[n] for n in self.metrics if n in values}
        metrics[f"{self.train_prefix}tokens"] = self._tokens_total
        metrics[f"{self.train_prefix}tokens_per_sec"] = values["tokens"] / max(seconds, 1e-9)
        self._emit(trainer, pl_module, metrics, step, prog_bar=self.prog_bar)
        self._last_logged_step = step

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
        # KPIs (train/tokens). Each pl_module.log costs ~0.3 ms, so rates stay logger-only; CPU
        # tensors, because Lightning reads progress-bar values with .item() at every batch.
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
        summaries = {}
        for stage in self.stages:
            for key in self.keys(stage):
                summaries[key] = SUMMARIES.get(key.rsplit("/", 1)[-1])
        define_wandb_metrics(trainer, summaries)
        self._slice_keys_declared = set()
        self._define_slice_metrics(trainer, self._slices_seen)

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
        # the loss the step trained on, to check against the monitor's own numbers
        stage = "train" if hook == "training_step" else "val"
        loss_check = self._check_for(stage, outputs) if check else None
        if isinstance(outputs, Mapping):
            stats = outputs.get("stats")
            if isinstance(stats, TokenStats):
                if per_sequence and stats.shape == () and from_patched is not None:
                    return from_patched  # the same pass, one sum per sequence
                return self._per_sequence(stats, hook) if per_sequence else stats.sum()
            if "logits" in outputs and "labels" in outputs:
                logits, labels = outputs["logits"], outputs["labels"]
                return self._run_op(logits, labels, loss_check, loss_scale, per_sequence)
        if from_patched is not None:
            return from_patched
        if self.extract is not None:
            got = self.extract(outputs, batch)
            if got is None or isinstance(got, TokenStats):
                if per_sequence:
                    return self._per_sequence(got, hook)
                return None if got is None else got.sum()
            if isinstance(got, tuple) and len(got) == 2:
                return self._run_op(*got, loss_check, loss_scale, per_sequence)
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
            self._patched = patched_models(pl_module) if hasattr(pl_module, "modules") else []
        return pop_token_stats(self._patched, per_sequence=per_sequence)

    def _run_op(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        check: tuple[LossCheck, torch.Tensor] | None = None,
        loss_scale: float = 1.0,
        per_sequence: bool = False,
    ) -> TokenStats:
        # per-token NLL only while checking: it gives the other shift convention for free
        spec = self.spec if check is None else dataclasses.replace(self.spec, reduction="none")
        with torch.no_grad():
            per_token, stats = _cross_entropy(
                logits.detach(),
                labels,
                spec,
                return_stats=True,
                backend=self.backend,
                per_sequence_stats=per_sequence,
            )
            if check is not None:
                accumulated, loss = check
                other = other_shift_nll(
                    logits,
                    labels,
                    per_token,
                    shift=spec.shift,
                    ignore_index=spec.ignore_index,
                    softcap=spec.softcap,
                )
                accumulated.add(loss.detach() * loss_scale, stats.sum(), other)
        return stats

    def _check_for(self, stage: str, outputs: Any) -> tuple[LossCheck, torch.Tensor] | None:
        """The check of ``stage`` and the step's loss, while that stage is still checked."""
        if not self.check_loss or self._windows_to_check[stage] <= 0:
            return None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            return None
        return self._checks[stage], loss

    def _finish_check(self, trainer: Any, stage: str) -> None:
        """Compare the window's losses (called where the window is read, a sync anyway)."""
        check = self._checks[stage]
        if check.sums is None:
            return
        self._windows_to_check[stage] -= 1
        if not trainer.is_global_zero:  # one warning per job; the other ranks skip the read
            check.reset()
            return
        result = check.compare(rtol=_LOSS_RTOL, atol=_LOSS_ATOL)
        if result is None or result.agrees:
            return
        self._windows_to_check = dict.fromkeys(_STAGES, 0)  # warned once: stop checking
        for other in self._checks.values():
            other.reset()
        warnings.warn(self._mismatch_message(result, stage), UserWarning, stacklevel=2)

    def _mismatch_message(self, result: LossComparison, stage: str) -> str:
        hook = "training_step" if stage == "train" else "validation_step"
        prefix = self.train_prefix if stage == "train" else self.val_prefix
        shift, ignore_index = self.spec.shift, self.spec.ignore_index
        gap = abs(result.loss - result.cross_entropy) / max(abs(result.loss), _LOSS_ATOL)
        message = (
            f"LossMonitor: the loss {hook} returned ({result.loss:.4f}, mean over "
            f"{result.batches} micro-batches) is not the cross-entropy LossMonitor computes from "
            f"the logits and labels it got ({result.cross_entropy:.4f}, {gap:.1%} apart): "
            f"{prefix}cross_entropy, {prefix}perplexity and {prefix}token_accuracy do not "
            "describe the loss being trained. "
        )
        if result.other_shift_agrees:
            if shift:
                return message + (
                    f"With shift=False it would be about {result.other_shift:.4f} (on the tokens "
                    "both conventions score), close to the loss: the labels look already shifted "
                    "(labels[t] is the token after position t); pass LossMonitor(shift=False)."
                )
            return message + (
                f"With shift=True it would be about {result.other_shift:.4f} (on the tokens both "
                "conventions score), close to the loss: the labels look unshifted (Hugging Face "
                "style, labels == input_ids and the model's loss shifts them); pass "
                "LossMonitor(shift=True)."
            )
        other = (
            ""
            if result.other_shift is None
            else f"; with shift={not shift} it would be {result.other_shift:.4f}, no closer"
        )
        return message + (
            f"Likely causes: `shift` (now {shift}{other}), `ignore_index` (now {ignore_index}; "
            "positions the loss skips must carry it), `softcap`, a loss that is not the mean "
            "over the scored tokens of the micro-batch (a mean per sequence, a sum divided by "
            "something else), or loss options such as label_smoothing or z_loss. If the "
            "difference is intended, LossMonitor(check_loss=False) turns this check off."
        )

    @staticmethod
    def _reduce(trainer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """Sum over ranks through the trainer's strategy (identity on one process)."""
        if trainer.world_size <= 1:
            return lambda tensor: tensor
        strategy = trainer.strategy
        # the collective runs on the strategy's device (NCCL needs CUDA tensors, gloo CPU ones)
        return lambda tensor: strategy.reduce(tensor.to(strategy.root_device), reduce_op="sum")

    @staticmethod
    def _reduced_state(acc: StatsAccumulator, reduce: Any) -> torch.Tensor | None:
        if reduce is None:
            return acc.state()
        sums = acc.sums if acc.sums is not None else torch.zeros(4, dtype=torch.float64)
        return reduce(sums.clone()).detach().cpu()


def _gather_names(trainer: Any) -> Callable[[list[str]], list[list[str]]]:
    """Every rank's list of names (a collective under DDP; the identity on one process)."""
    if trainer.world_size <= 1:
        return lambda names: [names]

    def gather(names: list[str]) -> list[list[str]]:
        everyone: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, names)
        return everyone

    return gather


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


def _last_epoch(trainer: Any) -> bool:
    """Whether this is fit's last epoch by ``max_epochs``: the same on every rank, unlike
    ``trainer.should_stop``, which a callback may set on one rank only (the window's all-reduce
    would then wait forever)."""
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
