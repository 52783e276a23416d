"""What a backend needs to know about one cross-entropy call, and what it gives back.

:class:`LossSpec` is where the options of the fused losses are checked, once: the public ops,
the ``nn`` modules, the metrics, :class:`~lossplug.LossMonitor` and the Hugging Face patch each
build one with :meth:`LossSpec.validated` and pass it down, never the loose keywords.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

Reduction = Literal["mean", "sum", "none"]
AllIgnored = Literal["zero", "nan"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
ALL_IGNORED: tuple[str, ...] = ("zero", "nan")


@dataclass(frozen=True)
class LossSpec:
    """The options of a fused loss, validated (build one with :meth:`validated`).

    The first five fields are the per-row loss math every backend reads. ``shift``,
    ``reduction`` and ``all_ignored`` are not: the op applies them around the backend (the
    target's shift before, the reduction after), and the backends never read them. They live
    here all the same, because they are checked with the others and travel with them through
    ``nn``, the metrics and the monitors: one object to build, to pass down and to read, where
    two would be passed side by side everywhere.
    """

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    # False when only the NLL is wanted (perplexity metrics): backends may then skip the argmax
    # and entropy (the PyTorch path does: on a CPU they cost as much as the rest)
    full_stats: bool = True
    shift: bool = False
    reduction: Reduction = "mean"
    all_ignored: AllIgnored = "zero"

    @classmethod
    def validated(
        cls,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: bool = False,
        all_ignored: AllIgnored = "zero",
        full_stats: bool = True,
    ) -> LossSpec:
        """The spec of these options, each checked: an error names the argument and its value.

        The defaults are those of :func:`lossplug.cross_entropy`. Integers and reals of any
        kind (a NumPy scalar read from a config too) are stored as ``int`` and ``float``. Only
        the check that needs the target (``shift=True`` needs a sequence axis) is left to the op.

        Raises:
            TypeError: ``ignore_index`` not an integer, ``shift`` not a bool, ``softcap`` not
                a number.
            ValueError: a value out of range or not among the allowed names.
        """
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if all_ignored not in ALL_IGNORED:
            raise ValueError(f"all_ignored must be one of {ALL_IGNORED}, got {all_ignored!r}")
        if not _is_real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        if not _is_real(z_loss) or not (z_loss >= 0.0 and math.isfinite(z_loss)):
            raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
        if softcap is not None:
            if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
                raise TypeError(f"softcap must be None or a finite number > 0, got {softcap!r}")
            if not (softcap > 0.0 and math.isfinite(softcap)):
                raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
        if not isinstance(shift, bool):
            raise TypeError(f"shift must be a bool, got {shift!r}")
        if not isinstance(full_stats, bool):
            raise TypeError(f"full_stats must be a bool, got {full_stats!r}")
        return cls(
            ignore_index=int(ignore_index),
            label_smoothing=float(label_smoothing),
            z_loss=float(z_loss),
            softcap=None if softcap is None else float(softcap),
            full_stats=full_stats,
            shift=shift,
            reduction=reduction,
            all_ignored=all_ignored,
        )

    def replace(self, **changes: object) -> LossSpec:
        """A copy with ``changes``, validated as :meth:`validated` validates."""
        return LossSpec.validated(**{**dataclasses.asdict(self), **changes})  # type: ignore[arg-type]

    def target_masks(
        self, target: torch.Tensor, vocab: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ignored, invalid, safe)`` per row: ignored rows, rows whose label is out of range,
        and the labels with both replaced by 0 (safe to gather with)."""
        ignored = target == self.ignore_index
        invalid = ~ignored & ((target < 0) | (target >= vocab))
        return ignored, invalid, torch.where(ignored | invalid, 0, target)

    def training_loss(
        self, nll: torch.Tensor, lse: torch.Tensor, z_mean: torch.Tensor | None
    ) -> torch.Tensor:
        """The per-row training loss from the NLL: label smoothing (``z_mean``, the row's mean
        logit, is needed only with smoothing) plus the z-loss term. Always a new tensor, so the
        loss and the NLL never alias (autograd treats them differently)."""
        eps = self.label_smoothing
        loss = (1 - eps) * nll + eps * (lse - z_mean) if eps > 0 else nll.clone()
        if self.z_loss > 0:
            loss = loss + self.z_loss * lse.square()
        return loss


@dataclass(frozen=True)
class RowOutputs:
    """Per-row results of the forward pass, each ``[N]``; every one is 0 at ignored rows.

    ``loss`` is the training loss of the row (smoothing and z-loss included), ``nll`` the pure
    negative log-likelihood of the true token, ``lse`` the log-sum-exp of the (soft-capped) logits,
    ``entropy`` the entropy of the predictive distribution and ``correct`` 1 where the argmax is the
    true token. All float32 (float64 for float64 inputs, on the PyTorch path) except ``correct``
    (int32).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(loss, nll, lse, entropy, correct)``: the fields in order (not copies)."""
        return self.loss, self.nll, self.lse, self.entropy, self.correct

    def mask_(self, ignored: torch.Tensor, invalid: torch.Tensor) -> RowOutputs:
        """Zero the ignored rows and make the loss of rows with an invalid label ``nan``.

        ``nan``, never a number, for a label the caller did not validate (no host sync to raise
        instead). In place; returns ``self``.
        """
        self.loss.masked_fill_(invalid, float("nan"))
        self.nll.masked_fill_(invalid, float("nan"))
        for out in (self.loss, self.nll, self.lse, self.entropy):
            out.masked_fill_(ignored, 0.0)
        self.correct.masked_fill_(ignored | invalid, 0)
        return self


class NeededGrads(NamedTuple):
    """Which gradients of the fused linear loss to compute: of ``hidden``, ``weight``, ``bias``."""

    hidden: bool
    weight: bool
    bias: bool


class LinearGrads(NamedTuple):
    """Gradients of the fused linear loss (``None`` where not wanted), in float32 (float64 for
    float64 inputs) or the inputs' dtype: the op casts each to its input's dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _is_real(value: object) -> bool:
    """A real number that is not a bool and not ``nan``."""
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)  # type: ignore[arg-type]
    )
