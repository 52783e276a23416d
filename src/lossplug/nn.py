"""Drop-in ``torch.nn`` modules over the fused ops."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lossplug.ops.cross_entropy import AllIgnored, Reduction, _validate, cross_entropy
from lossplug.ops.linear_cross_entropy import linear_cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = ["FusedCrossEntropyLoss", "FusedLinearCrossEntropyLoss"]


class FusedCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` for ``[N, V]`` or ``[B, T, V]`` logits, fused, with token statistics.

    Unlike ``nn.CrossEntropyLoss`` the class dimension is always the last one (the layout language
    models produce), there is no ``weight`` argument, and every call keeps the statistics of its
    pass on :attr:`last_stats` (device tensors, no host synchronisation). The keywords are those of
    :func:`lossplug.cross_entropy`.

    Example:
        >>> import torch, lossplug
        >>> criterion = lossplug.FusedCrossEntropyLoss(ignore_index=-100, shift=True)
        >>> logits = torch.randn(2, 6, 50, requires_grad=True)
        >>> labels = torch.randint(0, 50, (2, 6))
        >>> loss = criterion(logits, labels)
        >>> loss.backward()
        >>> int(criterion.last_stats.tokens)
        10
    """

    last_stats: TokenStats | None

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: bool = False,
        backend: Literal["auto", "torch", "triton"] = "auto",
        inplace_backward: bool = False,
        all_ignored: AllIgnored = "zero",
    ) -> None:
        super().__init__()
        # fail at construction, not at the first batch
        probe = torch.zeros(1, 1)
        _validate(
            probe,
            torch.zeros(1, dtype=torch.long),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            shift=shift,
            all_ignored=all_ignored,
        )
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got {backend!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.shift = shift
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.all_ignored = all_ignored
        self.last_stats = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, stats = cross_entropy(
            input,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            shift=self.shift,
            return_stats=True,
            backend=self.backend,
            inplace_backward=self.inplace_backward,
            all_ignored=self.all_ignored,
        )
        self.last_stats = stats
        return loss

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, shift={self.shift}, backend={self.backend!r}"
        )


class FusedLinearCrossEntropyLoss(nn.Module):
    """The loss of an output layer, ``weight [V, D]`` (and ``bias``), without its logits.

    ``criterion(hidden, weight, target, bias=None)`` equals ``FusedCrossEntropyLoss`` applied to
    ``F.linear(hidden, weight, bias)``, computed by :func:`lossplug.linear_cross_entropy`: the
    ``[N, V]`` logits never exist, and every call keeps its statistics on :attr:`last_stats`.

    Example:
        >>> import torch, lossplug
        >>> head = torch.nn.Linear(16, 50, bias=False)
        >>> criterion = lossplug.FusedLinearCrossEntropyLoss(shift=True)
        >>> hidden = torch.randn(2, 6, 16, requires_grad=True)
        >>> labels = torch.randint(0, 50, (2, 6))
        >>> loss = criterion(hidden, head.weight, labels)
        >>> loss.backward()
        >>> int(criterion.last_stats.tokens)
        10
    """

    last_stats: TokenStats | None

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: bool = False,
        backend: Literal["auto", "torch", "triton"] = "auto",
        all_ignored: AllIgnored = "zero",
    ) -> None:
        super().__init__()
        _validate(
            torch.zeros(1, 1),
            torch.zeros(1, dtype=torch.long),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            shift=shift,
            all_ignored=all_ignored,
        )
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got {backend!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.shift = shift
        self.backend = backend
        self.all_ignored = all_ignored
        self.last_stats = None

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss, stats = linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            shift=self.shift,
            return_stats=True,
            backend=self.backend,
            all_ignored=self.all_ignored,
        )
        self.last_stats = stats
        return loss

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, shift={self.shift}, backend={self.backend!r}"
        )
