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


@dataclass(frozen=True)
class RowOutputs:
    """Per-row results of the forward pass, each ``[N]``; every one is 0 at ignored rows.

    ``loss`` is the training loss of the row (smoothing and z-loss included), ``nll`` the pure
    negative log-likelihood of the true token, ``lse`` the log-sum-exp of the (soft-capped) logits,
    ``entropy`` the entropy of the predictive distribution and ``correct`` 1 where the argmax is the
    true token. All float32 except ``correct`` (int32).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor


class LinearGrads(NamedTuple):
    """Gradients of the fused linear loss (``None`` where not wanted): float32 except ``hidden``,
    which has the input's dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
