"""The model-centric numbers of a run, whichever trainer drives it: windows, slices, checks, state.

:class:`LossTracker` owns everything the Lightning ``LossMonitor`` and the ``transformers``
``LossplugCallback`` have in common: the token sums of the training window, the epoch and the
evaluation (and its slices), the running token total and the training-time rate, the comparison
of the trained loss with the monitor's own cross-entropy, the logged keys and their W&B
summaries, and what a checkpoint keeps. The adapters decide *when* (their trainer's hooks) and
*where to* (their trainer's loggers); the reductions across ranks are passed in as functions, so
nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lossplug.monitoring.clock import CLOCK
from lossplug.monitoring.keys import STAGES, metric_summary
from lossplug.monitoring.loss_check import LossCheck, LossComparison, other_shift_nll
from lossplug.monitoring.sums import (
    Gather,
    Reduce,
    SliceAccumulator,
    StatsAccumulator,
    identity,
    single_process,
)
from lossplug.ops._spec import LossSpec
from lossplug.ops.cross_entropy import measure_logits
from lossplug.ops.stats import TokenStats

# A "mean" loss and the monitor's NLL of the same logits agree to float32 rounding; a bf16 loss
# is rounded to 8 bits (0.4 %), so 2 % never trips on correct bf16 runs while a wrong `shift` on
# a model that predicts anything is off by far more (tens of percent).
LOSS_RTOL, LOSS_ATOL = 0.02, 1e-3
# The check is on the first windows only: a wrong setup shows from the start, and later a loss
# with label smoothing drifts away from the cross-entropy as the model sharpens.
_CHECKED_WINDOWS = {"train": 3, "val": 1}
# A fine-tune does not start out predicting 99 % of its labels: labels equal to the inputs do.
_SUSPICIOUS_ACCURACY = 0.99


class LossTracker:
    """Token sums of the training window, the epoch and the evaluation, and what follows from them.

    Adding never synchronises with the host; reading (at a logging step, an evaluation's end)
    reduces the sums across ranks once through the ``reduce``/``gather`` functions the adapter
    passes, which every rank must call together.

    Args:
        metrics: which of :data:`~lossplug.monitoring.keys.METRIC_NAMES` to log.
        train_prefix: prefix of the training keys.
        val_prefix: prefix of the evaluation keys.
        log_epoch: also keep the sums of the training epoch.
        slice_by: evaluation values are also split by slice (the adapter reads the labels).
        check_loss: compare the trained loss with the tracker's own cross-entropy.
        spec: the options of the logits/labels form (shift, ignore_index, softcap), named in
            the loss check's warning.
        owner: the adapter's name, for messages.
        stages: the stages the adapter logs.

    Example:
        >>> import torch, lossplug
        >>> tracker = LossTracker(metrics=("perplexity",), check_loss=False)
        >>> _, stats = lossplug.cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 2]),
        ...                                   return_stats=True)
        >>> tracker.add_train(stats)
        >>> round(tracker.read_window()["train/perplexity"], 6)
        4.0
    """

    def __init__(
        self,
        *,
        metrics: Sequence[str],
        train_prefix: str = "train/",
        val_prefix: str = "val/",
        log_epoch: bool = False,
        slice_by: Any = None,
        check_loss: bool = True,
        spec: LossSpec | None = None,
        owner: str = "LossMonitor",
        stages: Sequence[str] = STAGES,
    ) -> None:
        self.metrics = tuple(metrics)
        self.prefixes = {"train": train_prefix, "val": val_prefix}
        self.log_epoch = log_epoch
        self.slice_by = slice_by
        self.check_loss = check_loss
        self.spec = spec if spec is not None else LossSpec.validated(reduction="sum")
        self.owner = owner
        self.stages = tuple(stages)
        self.window = StatsAccumulator()
        self.epoch = StatsAccumulator()
        self.val = StatsAccumulator()
        self.val_slices = SliceAccumulator()
        self.tokens_total = 0
        self.last_logged_step = -1
        self.slices_seen: list[str] = []  # every slice logged so far, kept across a resume
        self._window_started = CLOCK.now()
        self._checks = {stage: LossCheck() for stage in STAGES}
        self._windows_to_check = dict(_CHECKED_WINDOWS)
        self._warned_accuracy = False
        self._declared: set[str] = set()  # keys whose W&B summary was handed out

    # ----------------------------------------------------------------------------------- keys
    def keys(self, stage: str) -> list[str]:
        """The keys logged for ``stage`` (``"train"`` or ``"val"``)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be 'train' or 'val', got {stage!r}")
        prefix = self.prefixes[stage]
        keys = [f"{prefix}{name}" for name in self.metrics] + [f"{prefix}tokens"]
        if stage == "train":
            keys.append(f"{prefix}tokens_per_sec")
        return keys

    def slice_keys(self, slice_name: str) -> list[str]:
        """The evaluation keys logged for one slice (``slice_by``)."""
        return [f"{key}/{slice_name}" for key in self.keys("val")]

    def summary(self, key: str) -> str | None:
        """W&B's summary of a key this tracker logs (``None``: W&B's default, the last value)."""
        return metric_summary(key, list(self.prefixes.values()))

    def summaries(self, stages: Sequence[str] = STAGES) -> dict[str, str | None]:
        """Every key of ``stages`` (slices seen so far included) with its W&B summary, for a
        run that starts: they are all declared from now on (see :meth:`new_summaries`)."""
        keys = [key for stage in stages for key in self.keys(stage)]
        if "val" in stages:
            keys += self.seen_slice_keys()
        summaries = {key: self.summary(key) for key in keys}
        self._declared = set(summaries)
        return summaries

    def new_summaries(self, keys: Iterable[str]) -> dict[str, str | None]:
        """W&B's summary of each key in ``keys`` not declared before; each key is declared once."""
        new = {key: self.summary(key) for key in keys if key not in self._declared}
        self._declared.update(new)
        return new

    def seen_slice_keys(self) -> list[str]:
        """The evaluation keys of every slice logged so far."""
        return [key for name in self.slices_seen for key in self.slice_keys(name)]

    # --------------------------------------------------------------------------------- adding
    def add_train(self, stats: TokenStats) -> None:
        """Add a training micro-batch's statistics (summed over its sequences)."""
        self.window.add(stats)
        if self.log_epoch:
            self.epoch.add(stats)

    def add_val(
        self, stats: TokenStats, labels: Sequence[str] | torch.Tensor | None = None
    ) -> None:
        """Add an evaluation batch: summed, and per slice when ``labels`` (one per sequence of
        the per-sequence ``stats``) are given."""
        self.val.add(stats.sum())
        if labels is not None:
            self.val_slices.add(stats, labels)

    def reset_val(self) -> None:
        self.val.reset()
        self.val_slices.reset()

    def start_training(self) -> None:
        """Training (re)starts: the rate's clock starts from now."""
        self._window_started = CLOCK.now()

    def score(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        stage: str,
        *,
        loss: torch.Tensor | None = None,
        loss_scale: float = 1.0,
        backend: str = "auto",
        per_sequence: bool = False,
    ) -> TokenStats:
        """The statistics of ``logits``/``labels`` (one forward-only pass of the fused op), and,
        while ``stage`` is still checked, the trained ``loss`` compared with them."""
        check = self._check(stage, loss)
        # per-token NLL only while checking: it gives the other shift convention for free
        spec = self.spec if check is None else dataclasses.replace(self.spec, reduction="none")
        per_token, stats = measure_logits(
            logits, labels, spec, backend=backend, per_sequence_stats=per_sequence
        )
        if check is not None:
            with torch.no_grad():
                other = other_shift_nll(
                    logits,
                    labels,
                    per_token,
                    shift=spec.shift,
                    ignore_index=spec.ignore_index,
                    softcap=spec.softcap,
                )
                check.add(loss.detach() * loss_scale, stats.sum(), other)
        return stats

    # -------------------------------------------------------------------------------- reading
    def read_window(self, reduce: Reduce = identity, *, is_rank_zero: bool = True) -> dict:
        """The training window since the last read, as logged keys (a collective): the metrics,
        the running ``tokens`` and ``tokens_per_sec`` over training time only (evaluation and
        KPI time left out). Empty when no rank scored a token in the window."""
        values = self.window.read(reduce)
        self.window.reset()
        self.finish_check("train", is_rank_zero=is_rank_zero)
        now = CLOCK.now()
        seconds, self._window_started = now - self._window_started, now
        if values["tokens"] <= 0:
            return {}
        self.tokens_total += int(values["tokens"])
        prefix = self.prefixes["train"]
        metrics = self._named("train", values)
        metrics[f"{prefix}tokens"] = float(self.tokens_total)
        metrics[f"{prefix}tokens_per_sec"] = values["tokens"] / max(seconds, 1e-9)
        if is_rank_zero:
            self._check_accuracy(values)
        return metrics

    def read_epoch(self, reduce: Reduce = identity) -> dict[str, float]:
        """The training epoch's aggregate as ``<train prefix><metric>_epoch`` (a collective)."""
        values = self.epoch.read(reduce)
        self.epoch.reset()
        prefix = self.prefixes["train"]
        return {f"{prefix}{n}_epoch": values[n] for n in self.metrics if n in values}

    def read_val(
        self,
        reduce: Reduce = identity,
        gather: Gather = single_process,
        *,
        is_rank_zero: bool = True,
        empty_ok: bool = True,
    ) -> dict[str, float]:
        """The evaluation's values, per slice too under ``slice_by`` (a collective); then the
        evaluation sums start again. ``empty_ok=False`` returns nothing when no token was
        scored (an evaluation whose model computed no statistics)."""
        values = self.val.read(reduce)
        self.val.reset()
        self.finish_check("val", is_rank_zero=is_rank_zero)
        if values["tokens"] <= 0 and not empty_ok:
            self.val_slices.reset()
            return {}
        metrics = self._named("val", values)
        metrics[f"{self.prefixes['val']}tokens"] = values["tokens"]
        if self.slice_by is not None:
            metrics.update(self._read_slices(reduce, gather))
        if is_rank_zero:
            self._check_accuracy(values)
        return metrics

    def _read_slices(self, reduce: Reduce, gather: Gather) -> dict[str, float]:
        per_slice = self.val_slices.read(reduce, gather)
        self.val_slices.reset()
        prefix = self.prefixes["val"]
        metrics: dict[str, float] = {}
        for name, values in per_slice.items():
            for metric in (*self.metrics, "tokens"):
                if metric in values:
                    metrics[f"{prefix}{metric}/{name}"] = values[metric]
            if name not in self.slices_seen:
                self.slices_seen.append(name)
        return metrics

    def _named(self, stage: str, values: Mapping[str, float]) -> dict[str, float]:
        prefix = self.prefixes[stage]
        return {f"{prefix}{name}": values[name] for name in self.metrics if name in values}

    # ------------------------------------------------------------------------------ the check
    def _check(self, stage: str, loss: Any) -> LossCheck | None:
        """The check of ``stage``, while that stage is still checked and the loss can be read."""
        if not self.check_loss or self._windows_to_check[stage] <= 0:
            return None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            return None
        return self._checks[stage]

    def finish_check(self, stage: str, *, is_rank_zero: bool = True) -> None:
        """Compare the window's losses (called where the window is read, a sync anyway) and warn
        once, with the likely cause, when they disagree."""
        check = self._checks[stage]
        if check.sums is None:
            return
        self._windows_to_check[stage] -= 1
        if not is_rank_zero:  # one warning per job; the other ranks skip the read
            check.reset()
            return
        result = check.compare(rtol=LOSS_RTOL, atol=LOSS_ATOL)
        if result is None or result.agrees:
            return
        self._windows_to_check = dict.fromkeys(STAGES, 0)  # warned once: stop checking
        for other in self._checks.values():
            other.reset()
        warnings.warn(self._mismatch_message(result, stage), UserWarning, stacklevel=3)

    def _mismatch_message(self, result: LossComparison, stage: str) -> str:
        hook = "training_step" if stage == "train" else "validation_step"
        shift, ignore_index = self.spec.shift, self.spec.ignore_index
        gap = abs(result.loss - result.cross_entropy) / max(abs(result.loss), LOSS_ATOL)
        # the options are the same for every stage the monitor scores: a wrong one is wrong in
        # each of them, whichever stage showed it first (validation may not have run yet)
        stages = [s for s in STAGES if s == stage or s in self.stages]
        named = ", ".join(
            f"{self.prefixes[s]}{name}"
            for s in stages
            for name in ("cross_entropy", "perplexity", "token_accuracy")
        )
        message = (
            f"{self.owner}: the loss {hook} returned ({result.loss:.4f}, mean over "
            f"{result.batches} micro-batches) is not the cross-entropy {self.owner} computes from "
            f"the logits and labels it got ({result.cross_entropy:.4f}, {gap:.1%} apart): "
            f"{named} do not describe the loss being trained. "
        )
        if result.other_shift_agrees:
            if shift:
                return message + (
                    f"With shift=False it would be about {result.other_shift:.4f} (on the tokens "
                    "both conventions score), close to the loss: the labels look already shifted "
                    f"(labels[t] is the token after position t); pass {self.owner}(shift=False)."
                )
            return message + (
                f"With shift=True it would be about {result.other_shift:.4f} (on the tokens both "
                "conventions score), close to the loss: the labels look unshifted (Hugging Face "
                "style, labels == input_ids and the model's loss shifts them); pass "
                f"{self.owner}(shift=True)."
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
            f"difference is intended, {self.owner}(check_loss=False) turns this check off."
        )

    def _check_accuracy(self, values: Mapping[str, float]) -> None:
        """Warn once when the first values logged predict nearly every label: the labels are
        then most likely the inputs themselves, scored without the causal shift."""
        if self._warned_accuracy or values.get("tokens", 0) <= 0:
            return
        self._warned_accuracy = True  # the first values only: a model may learn that well later
        accuracy = values["token_accuracy"]
        if accuracy < _SUSPICIOUS_ACCURACY:
            return
        warnings.warn(
            f"{self.owner}: the first values logged have a token accuracy of {accuracy:.4f}: "
            "the model predicts nearly every label before it has trained, which a language "
            "model does not. The labels most likely equal the inputs (Hugging Face style, "
            "labels == input_ids) and were scored without the causal shift, so the loss trains "
            "the model to copy its input and every train/ and val/ value is meaningless. Pass "
            "shift=True to lossplug.cross_entropy / LossMonitor, or shift the labels yourself.",
            UserWarning,
            stacklevel=3,
        )

    # ---------------------------------------------------------------------------------- state
    def state_dict(self, reduce: Reduce | None = None) -> dict[str, Any]:
        """What a checkpoint keeps. With ``reduce`` (a collective: every rank builds its
        checkpoint) the partial sums are those of all ranks, which rank 0 alone takes back."""
        return {
            "version": 1,
            "tokens_total": self.tokens_total,
            "last_logged_step": self.last_logged_step,
            "window": self.saved_window(reduce),
            # no epoch sums (and no collective for them) unless the epoch is logged
            "epoch": _saved(self.epoch, reduce) if self.log_epoch else None,
            "slices_seen": list(self.slices_seen),
        }

    def saved_window(self, reduce: Reduce | None = None) -> torch.Tensor | None:
        """The window's sums as a checkpoint keeps them (over all ranks with ``reduce``)."""
        return _saved(self.window, reduce)

    def load_state_dict(self, state: Mapping[str, Any], *, is_rank_zero: bool = True) -> None:
        self.tokens_total = int(state.get("tokens_total", 0))
        self.last_logged_step = int(state.get("last_logged_step", -1))
        self.slices_seen = [str(name) for name in state.get("slices_seen", [])]
        for acc, key in ((self.window, "window"), (self.epoch, "epoch")):
            saved = state.get(key)
            if saved is not None and not isinstance(saved, torch.Tensor):
                saved = torch.tensor(saved, dtype=torch.float64)
            acc.load(saved if is_rank_zero else None)


def _saved(acc: StatsAccumulator, reduce: Reduce | None) -> torch.Tensor | None:
    return acc.state() if reduce is None else acc.reduced(reduce).detach().cpu()
