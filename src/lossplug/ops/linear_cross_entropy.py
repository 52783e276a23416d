"""``lossplug.linear_cross_entropy``: the loss of a linear head without its ``[N, V]`` logits."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from lossplug.ops import _dispatch
from lossplug.ops._dispatch import LinearCrossEntropyBackend
from lossplug.ops._spec import (
    AllIgnored,
    LinearGrads,
    LossSpec,
    NeededGrads,
    Reduction,
    RowOutputs,
)
from lossplug.ops.cross_entropy import (
    _FLOAT_DTYPES,
    _check_per_sequence,
    _check_shift,
    _check_target_values,
    _loss_shape,
    _reduce,
    _row_stats,
    _shift_left,
    _unshift,
)
from lossplug.ops.stats import TokenStats

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: Literal["auto", "torch", "triton"] = "auto",
    all_ignored: AllIgnored = "zero",
    check_target: bool | None = None,
    per_sequence_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, never holding the logits.

    Equal to ``lossplug.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), target,
    ...)`` (the same keywords, the same :class:`~lossplug.TokenStats`), but the logits of all
    tokens are never in memory at once: they are computed a block of tokens at a time, scored in
    float32 and turned into the gradients of ``hidden``, ``weight`` and ``bias`` right away. The
    weight gradient is accumulated in float32. Ignored tokens cost no matmul (on CPU tensors and
    on the Triton path).

    The logits are computed in the inputs' dtype, as the model's own output layer computes them,
    and everything after the matmul in float32 (in float64 for float64 inputs, which run on the
    PyTorch path).

    Args:
        hidden: ``[..., D]`` float32, float16, bfloat16 or float64 (the last hidden states);
            ``D`` may be 0 (the logits are then the bias, or zeros).
        weight: ``[V, D]``, the output layer's weight (``lm_head.weight``), same dtype as
            ``hidden``.
        target: integer ``[...]`` (``hidden.shape[:-1]``), each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` bias of the output layer.
        ignore_index: see :func:`lossplug.cross_entropy`; the same for the keywords that follow.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. A scalar loss has its gradients computed
            in the forward pass (three matmuls in all); ``"none"`` recomputes in the backward.
        label_smoothing: in ``[0, 1]``, as in ``torch.nn.functional.cross_entropy``.
        z_loss: coefficient of the ``lse**2`` term.
        softcap: soft-capping of the logits (``softcap * tanh(logits / softcap)``), as Gemma 2.
        shift: score position ``t`` against ``target[..., t + 1]`` (causal LM), no copy.
        return_stats: also return the :class:`~lossplug.TokenStats` of the same pass.
        backend: ``"torch"`` (chunked PyTorch with cuBLAS matmuls, any device), ``"triton"``
            (the fused kernels: CUDA, or the interpreter with ``TRITON_INTERPRET=1``) or
            ``"auto"``, which is ``"torch"`` on every device, CUDA included: the cost model
            predicts it ~4x faster than the atomics-bound Triton backward at DESIGN's shape.
        all_ignored: the ``"mean"`` loss when no token is scored: ``"zero"`` or ``"nan"``.
        check_target: validate target values: ``None`` when free (CPU), ``True``, ``False``.
        per_sequence_stats: statistics per sequence (fields of shape ``target.shape[:-1]``), as
            in :func:`lossplug.cross_entropy`.

    Returns:
        The loss, float32 (float64 for float64 inputs), or ``(loss, stats)`` when
        ``return_stats`` is true.

    Example:
        >>> import torch, lossplug
        >>> hidden = torch.randn(2, 7, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 50, bias=False)
        >>> labels = torch.randint(0, 50, (2, 7))
        >>> loss, stats = lossplug.linear_cross_entropy(
        ...     hidden, head.weight, labels, shift=True, return_stats=True
        ... )
        >>> loss.backward()
        >>> int(stats.tokens), tuple(head.weight.grad.shape)
        (12, (50, 16))
        >>> reference = lossplug.cross_entropy(head(hidden), labels, shift=True)
        >>> bool(torch.allclose(loss, reference))
        True
    """
    spec = LossSpec.validated(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        shift=shift,
        all_ignored=all_ignored,
    )
    return _linear_cross_entropy(
        hidden,
        weight,
        target,
        spec,
        bias=bias,
        return_stats=return_stats,
        backend=backend,
        check_target=check_target,
        per_sequence_stats=per_sequence_stats,
    )


def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    bias: torch.Tensor | None,
    return_stats: bool,
    backend: str,
    check_target: bool | None = None,
    per_sequence_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """:func:`linear_cross_entropy` with its options in ``spec`` (validated by the caller)."""
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_tensors(hidden, weight, target, bias)
    _check_per_sequence(per_sequence_stats, target)
    _check_shift(spec, target)
    if spec.full_stats and not return_stats:
        # as in cross_entropy: no statistics wanted, no argmax or entropy asked for
        spec = dataclasses.replace(spec, full_stats=False)
    loss_shape = _loss_shape(target, spec.shift)
    if spec.shift:
        target = _shift_left(target, spec.ignore_index)
    vocab, dim = weight.shape
    if check_target or (check_target is None and target.device.type == "cpu"):
        _check_target_values(
            target, vocab, spec.ignore_index, shifted=spec.shift, vocab_from="weight.shape[0]"
        )

    impl = _dispatch.resolve(backend, "linear_cross_entropy", hidden, "hidden")
    # the row count is given, not inferred (-1): with D = 0 there would be nothing to infer from
    hidden_rows = hidden.reshape(target.numel(), dim)
    target_rows = target.reshape(-1).to(torch.int64).contiguous()
    tokens = (target_rows != spec.ignore_index).sum()
    inputs = (hidden_rows, weight, bias)
    differentiable = any(t is not None and t.requires_grad for t in inputs)
    # the backends choose their own precisions; autocast would reroute their matmuls
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and differentiable:
            loss, *row_stats = _FusedLinearCrossEntropy.apply(
                *inputs, target_rows, tokens, spec, impl
            )
            # only the statistics are read from the rows; their loss field is not per row here
            rows = RowOutputs(loss, *row_stats)
        else:
            detached = [None if t is None else t.detach() for t in inputs]
            rows, _ = impl.forward(*detached, target_rows, spec, needs=None)
            loss = _reduce(rows.loss, tokens, spec)
    if spec.reduction == "none":
        loss = _unshift(loss, target.shape, spec.shift, loss_shape)
    if not return_stats:
        return loss
    return loss, _row_stats(rows, tokens, target_rows, spec, target.shape, per_sequence_stats)


def _autocast_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast to the autocast dtype where ``torch.nn.functional.linear`` would (differentiably).

    Autocast leaves float64 alone ("ops that run in float64 are not eligible"), so do we.
    """
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)
    return tuple(  # type: ignore[return-value]
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in (hidden, weight, bias)
    )


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The reduced (or per-row) loss with gradients for hidden, weight and bias.

    The row statistics ride along as non-differentiable outputs. Gradients a backend computed in
    the forward pass are scaled and handed over by the first backward; a second backward (with
    ``retain_graph=True``) recomputes them.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target_rows: torch.Tensor,
        tokens: torch.Tensor,
        spec: LossSpec,
        impl: LinearCrossEntropyBackend,
    ):
        needs = NeededGrads(*(bool(n) for n in ctx.needs_input_grad[:3]))
        precompute = spec.reduction != "none" and impl.PRECOMPUTES_GRAD
        rows, grads = impl.forward(
            hidden_rows, weight, bias, target_rows, spec, needs=needs if precompute else None
        )
        loss = _reduce(rows.loss, tokens, spec)
        ctx.save_for_backward(hidden_rows, weight, bias, target_rows, rows.lse, tokens)
        ctx.spec, ctx.impl, ctx.needs = spec, impl, needs
        ctx.precomputed = grads
        ctx.mark_non_differentiable(rows.nll, rows.lse, rows.entropy, rows.correct)
        return loss, rows.nll, rows.lse, rows.entropy, rows.correct

    @staticmethod
    @once_differentiable  # the gradients are not themselves differentiable: say so, loudly
    def backward(ctx, grad_loss, *_unused):
        hidden_rows, weight, bias, target_rows, lse, tokens = ctx.saved_tensors
        # float32 arithmetic, float64 for float64 inputs (their rows and gradients are float64)
        grad_loss = grad_loss.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        if ctx.spec.reduction == "mean":
            # the gradient is 0 when nothing is scored, whatever all_ignored made of the loss
            grad_loss = grad_loss / tokens.clamp(min=1)
        grads: LinearGrads | None = ctx.precomputed
        ctx.precomputed = None
        if grads is not None:  # the gradients of the summed loss: scale them, in place
            grads = LinearGrads(*(None if g is None else g.mul_(grad_loss) for g in grads))
        else:
            grad_rows = grad_loss.expand(target_rows.shape) if grad_loss.dim() == 0 else grad_loss
            grads = ctx.impl.backward(
                hidden_rows, weight, bias, target_rows, lse, grad_rows, ctx.spec, ctx.needs
            )
        return (
            _cast(grads.hidden, hidden_rows),
            _cast(grads.weight, weight),
            _cast(grads.bias, bias),
            None,
            None,
            None,
            None,
        )


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def _check_tensors(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None
) -> None:
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, float16, bfloat16 or float64, got dtype {hidden.dtype}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got dtype {weight.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor of class indices, got dtype {target.dtype}"
        )
    if hidden.dim() < 2:
        raise ValueError(
            f"hidden must be [..., D] with at least one token dimension, got shape "
            f"{tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [V, D] with V > 0 and D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target.shape {tuple(target.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])} (hidden.shape is {tuple(hidden.shape)})"
        )
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must be [V] = ({weight.shape[0]},) like weight.shape[0], "
                f"got shape {tuple(bias.shape)}"
            )
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"bias must be float32, float16, bfloat16 or float64, got dtype {bias.dtype}"
            )
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(
                f"{name} is on {value.device} but hidden is on {hidden.device}: use one device"
            )
