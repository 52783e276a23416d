"""What a backend needs to know about one cross-entropy call, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class LossSpec:
    """The loss options shared by every backend (already validated)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    # False when only the NLL is wanted (perplexity metrics): backends may then skip the argmax
    # and entropy, which cost as much as the rest on the CPU (on a GPU they are free)
    full_stats: bool = True

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


class LinearGrads(NamedTuple):
    """Gradients of the fused linear loss (``None`` where not wanted), in float32 (float64 for
    float64 inputs) or the inputs' dtype: the op casts each to its input's dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
