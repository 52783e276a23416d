"""Drop-in ``torch.nn`` modules over the fused ops."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lossplug.ops._dispatch import check_backend
from lossplug.ops._spec import AllIgnored, LossSpec, Reduction
from lossplug.ops.cross_entropy import _cross_entropy
from lossplug.ops.linear_cross_entropy import _linear_cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = ["FusedCrossEntropyLoss", "FusedLinearCrossEntropyLoss"]


def _spec_option(name: str) -> property:
    """An attribute that reads ``spec.<name>``; setting it builds a new, validated spec."""

    def get(self: _FusedLoss) -> Any:
        return getattr(self.spec, name)

    def set_(self: _FusedLoss, value: Any) -> None:
        self.spec = self.spec.replace(**{name: value})

    return property(get, set_, doc=f"``{name}`` of :func:`lossplug.cross_entropy`.")


class _FusedLoss(nn.Module):
    """The keywords the fused losses share, validated at construction into :attr:`spec`, and
    ``last_stats``.

    The options stay attributes, as in ``torch.nn.CrossEntropyLoss`` (``criterion.ignore_index``
    reads and sets them): each reads the spec, and setting one validates it into a new spec.
    """

    spec: LossSpec
    last_stats: TokenStats | None

    ignore_index = _spec_option("ignore_index")
    reduction = _spec_option("reduction")
    label_smoothing = _spec_option("label_smoothing")
    z_loss = _spec_option("z_loss")
    softcap = _spec_option("softcap")
    shift = _spec_option("shift")
    all_ignored = _spec_option("all_ignored")

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
        # fail at construction, not at the first batch
        self.spec = LossSpec.validated(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            shift=shift,
            all_ignored=all_ignored,
        )
        self.backend = check_backend(backend)
        self.last_stats = None

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, shift={self.shift}, backend={self.backend!r}"
        )


class FusedCrossEntropyLoss(_FusedLoss):
    """``nn.CrossEntropyLoss`` for ``[N, V]`` or ``[B, T, V]`` logits, fused, with token statistics.

    Unlike ``nn.CrossEntropyLoss`` the class dimension is always the last one (the layout language
    models produce), there is no ``weight`` argument, and every call keeps the statistics of its
    pass on :attr:`last_stats` (device tensors, no host synchronisation). The keywords are those of
    :func:`lossplug.cross_entropy`. The loss is float32, or float64 for float64 logits (computed
    in float64 on the PyTorch path), as ``nn.CrossEntropyLoss`` gives.

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
        super().__init__(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            shift=shift,
            backend=backend,
            all_ignored=all_ignored,
        )
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, stats = _cross_entropy(
            input,
            target,
            self.spec,
            return_stats=True,
            backend=self.backend,
            inplace_backward=self.inplace_backward,
        )
        self.last_stats = stats
        return loss


class FusedLinearCrossEntropyLoss(_FusedLoss):
    """The loss of an output layer, ``weight [V, D]`` (and ``bias``), without its logits.

    ``criterion(hidden, weight, target, bias=None)`` equals ``FusedCrossEntropyLoss`` applied to
    ``F.linear(hidden, weight, bias)``, computed by :func:`lossplug.linear_cross_entropy`: the
    ``[N, V]`` logits never exist, and every call keeps its statistics on :attr:`last_stats`.
    float64 inputs give a float64 loss and gradients, computed in float64.

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

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss, stats = _linear_cross_entropy(
            hidden,
            weight,
            target,
            self.spec,
            bias=bias,
            return_stats=True,
            backend=self.backend,
        )
        self.last_stats = stats
        return loss
