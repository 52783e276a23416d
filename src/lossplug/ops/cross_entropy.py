"""``lossplug.cross_entropy``: the training loss and its token statistics in one fused pass."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from lossplug.ops import _dispatch
from lossplug.ops._dispatch import CrossEntropyBackend, GradInForwardBackend
from lossplug.ops._spec import AllIgnored, LossSpec, Reduction, RowOutputs
from lossplug.ops.stats import TokenStats

__all__ = ["cross_entropy"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    return_stats: bool = False,
    backend: Literal["auto", "torch", "triton"] = "auto",
    inplace_backward: bool = False,
    all_ignored: AllIgnored = "zero",
    check_target: bool | None = None,
    per_sequence_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Cross-entropy of ``logits`` against ``target``, and optionally its token statistics.

    The semantics are those of :func:`torch.nn.functional.cross_entropy` with the class dimension
    last, computed in one pass over the logits with float32 arithmetic (a bf16/fp16 input is
    upcast block by block, never as a whole), or float64 arithmetic for float64 logits.

    Args:
        logits: ``[..., V]`` float32, float16, bfloat16 or float64; any leading shape, any
            strides. float64 runs on the PyTorch path (``backend="auto"`` picks it; the Triton
            kernels compute in float32 and refuse it).
        target: integer ``[...]`` (``logits.shape[:-1]``), each in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value that is not scored (no loss, no gradient, not counted).
        reduction: ``"mean"`` over the scored tokens, ``"sum"``, or ``"none"`` for the per-token
            loss (0 at ignored positions).
        label_smoothing: in ``[0, 1]``; mixes the one-hot target with the uniform distribution as
            ``torch.nn.functional.cross_entropy`` does.
        z_loss: coefficient of the ``lse**2`` term added to each scored token's loss.
        softcap: if set (> 0), the logits become ``softcap * tanh(logits / softcap)`` before the
            softmax (gradient included), as in Gemma 2.
        shift: score position ``t`` against ``target[..., t + 1]`` along the sequence (last target)
            axis, as causal language models do, without copying the logits; the last position is
            not scored. With ``reduction="none"`` the result has shape ``target[..., :-1]``
            (empty for sequences of one position, where nothing is scored).
        return_stats: also return the :class:`~lossplug.TokenStats` of the same pass.
        backend: ``"triton"`` forces the Triton kernels (CUDA, or the CPU interpreter with
            ``TRITON_INTERPRET=1``), ``"torch"`` the chunked PyTorch path, ``"auto"`` Triton for
            CUDA tensors when Triton imports and PyTorch otherwise.
        inplace_backward: write the gradient into the logits' own memory instead of a new buffer.
            Saves one logits-sized allocation, but the logits are overwritten by ``backward()``:
            only use it when nothing else needs them afterwards.
        all_ignored: the ``"mean"`` loss when no token is scored: ``"zero"`` (default; no gradient
            flows) or ``"nan"``. The statistics count zero tokens either way.
        check_target: validate the target values (range, negatives). ``None`` checks whenever
            that costs no host synchronisation (CPU tensors); ``True`` always checks (a sync on
            CUDA); ``False`` never. Unchecked invalid targets give a ``nan`` loss, never a wrong
            number.
        per_sequence_stats: the statistics hold one sum per sequence (fields of shape
            ``target.shape[:-1]``, the last target axis being the sequence) instead of one for
            the whole call, from the same pass: what per-slice metrics need
            (:meth:`TokenStats.sum_by`). Needs a target with a sequence axis.

    Returns:
        The loss, float32 (float64 for float64 logits, as ``torch.nn.functional.cross_entropy``
        gives), or ``(loss, stats)`` when ``return_stats`` is true.

    Example:
        >>> import torch, lossplug
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.randint(0, 11, (2, 5))
        >>> loss, stats = lossplug.cross_entropy(logits, labels, shift=True, return_stats=True)
        >>> loss.backward()
        >>> int(stats.tokens)
        8
        >>> bool(torch.isclose(stats.perplexity, loss.double().exp()))
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
    return _cross_entropy(
        logits,
        target,
        spec,
        return_stats=return_stats,
        backend=backend,
        inplace_backward=inplace_backward,
        check_target=check_target,
        per_sequence_stats=per_sequence_stats,
    )


def _cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    return_stats: bool,
    backend: str,
    inplace_backward: bool = False,
    check_target: bool | None = None,
    per_sequence_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """:func:`cross_entropy` with its options in ``spec`` (validated by the caller);
    ``spec.full_stats=False`` gives the NLL-only statistics (the metrics' cheaper pass)."""
    _check_per_sequence(per_sequence_stats, target)
    _check_logits_and_target(logits, target)
    _check_shift(spec, target)
    if spec.full_stats and not return_stats:
        # no statistics wanted, none asked for: the PyTorch path then skips the argmax and the
        # entropy (on a CPU they cost as much as the rest); the Triton kernels compute them anyway
        spec = dataclasses.replace(spec, full_stats=False)
    loss_shape = _loss_shape(target, spec.shift)
    if logits.dim() == 1:  # a single row, as torch accepts for a 0-d target
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    if spec.shift:
        target = _shift_left(target, spec.ignore_index)
    vocab = logits.shape[-1]
    if check_target or (check_target is None and target.device.type == "cpu"):
        _check_target_values(target, vocab, spec.ignore_index, shifted=spec.shift)

    impl = _dispatch.resolve(backend, "cross_entropy", logits, "logits")
    logits_rows = _as_rows(logits)
    target_rows = target.reshape(-1).to(torch.int64).contiguous()
    tokens = (target_rows != spec.ignore_index).sum()
    if not (torch.is_grad_enabled() and logits_rows.requires_grad):
        rows = impl.forward(logits_rows.detach(), target_rows, spec)
        loss = _reduce(rows.loss, tokens, spec)
    elif spec.reduction != "none" and not inplace_backward and impl.PRECOMPUTES_GRAD:
        loss, *outputs = _GradInForwardCrossEntropy.apply(
            logits_rows, target_rows, tokens, spec, impl
        )
        rows = RowOutputs(*outputs)
    else:
        rows = RowOutputs(
            *_FusedCrossEntropy.apply(logits_rows, target_rows, spec, impl, inplace_backward)
        )
        loss = _reduce(rows.loss, tokens, spec)
    if spec.reduction == "none":
        loss = _unshift(loss, target.shape, spec.shift, loss_shape)
    if not return_stats:
        return loss
    return loss, _row_stats(rows, tokens, target_rows, spec, target.shape, per_sequence_stats)


def measure_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    backend: str = "auto",
    per_sequence_stats: bool = False,
) -> tuple[torch.Tensor, TokenStats]:
    """The loss and statistics of logits that are only measured: the fused pass, forward only,
    with no graph (what the metrics and the monitors score)."""
    with torch.no_grad():
        return _cross_entropy(
            logits.detach(),
            target,
            spec,
            return_stats=True,
            backend=backend,
            per_sequence_stats=per_sequence_stats,
        )


def _reduce(loss_rows: torch.Tensor, tokens: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The loss of ``spec.reduction`` in the rows' dtype (sums in float64); ``"none"`` returns
    the rows.

    The rows are float32 for every input dtype except float64, so the loss is float32 or float64
    as ``torch.nn.functional.cross_entropy`` would give.
    """
    if spec.reduction == "none":
        return loss_rows
    total = loss_rows.sum(dtype=torch.float64)
    if spec.reduction == "sum":
        return total.to(loss_rows.dtype)
    return (total / _mean_denominator(tokens, spec)).to(loss_rows.dtype)


def _mean_denominator(tokens: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """What the ``"mean"`` loss divides by: 0 tokens give 0 (``"zero"``) or ``nan``."""
    return tokens.clamp(min=1) if spec.all_ignored == "zero" else tokens


def _loss_shape(target: torch.Tensor, shift: bool) -> tuple[int, ...]:
    """Shape of the ``reduction="none"`` loss: the target's, one position shorter if shifted
    (and empty, not negative, for a sequence of no positions)."""
    if not shift:
        return tuple(target.shape)
    return (*target.shape[:-1], max(target.shape[-1] - 1, 0))


def _unshift(
    loss_rows: torch.Tensor, target_shape: torch.Size, shift: bool, loss_shape: tuple
) -> torch.Tensor:
    """Per-token losses in the caller's shape (without the unscored last position if shifted)."""
    loss = loss_rows.view(target_shape)
    return (loss[..., :-1] if shift else loss).reshape(loss_shape)


def _row_stats(
    rows: RowOutputs,
    tokens: torch.Tensor,
    target_rows: torch.Tensor,
    spec: LossSpec,
    target_shape: torch.Size,
    per_sequence: bool,
) -> TokenStats:
    """The :class:`TokenStats` of a pass from its per-row outputs (device tensors, no sync):
    summed over every row, or over the last target axis only (one sum per sequence)."""
    if per_sequence:
        shape = tuple(target_shape)

        def per_sequence_sum(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return values.detach().reshape(shape).sum(-1, dtype=dtype)

        f64 = torch.float64
        return TokenStats(
            nll_sum=per_sequence_sum(rows.nll, f64),
            tokens=per_sequence_sum(target_rows != spec.ignore_index, torch.int64),
            correct=per_sequence_sum(rows.correct, torch.int64),
            entropy_sum=per_sequence_sum(rows.entropy, f64),
            lse_sq_sum=per_sequence_sum(rows.lse.detach().to(f64).square(), f64),
        )
    return TokenStats(
        nll_sum=rows.nll.detach().sum(dtype=torch.float64),
        tokens=tokens,
        correct=rows.correct.sum(dtype=torch.int64),
        entropy_sum=rows.entropy.detach().sum(dtype=torch.float64),
        lse_sq_sum=rows.lse.detach().to(torch.float64).square().sum(),
    )


class _FusedCrossEntropy(torch.autograd.Function):
    """Per-row loss with a gradient; the statistics ride along as non-differentiable outputs."""

    @staticmethod
    def forward(
        ctx, logits_rows, target_rows, spec: LossSpec, impl: CrossEntropyBackend, inplace: bool
    ):
        rows = impl.forward(logits_rows, target_rows, spec)
        ctx.save_for_backward(logits_rows, target_rows, rows.lse)
        ctx.spec, ctx.impl, ctx.inplace = spec, impl, inplace
        ctx.mark_non_differentiable(rows.nll, rows.lse, rows.entropy, rows.correct)
        return rows.loss, rows.nll, rows.lse, rows.entropy, rows.correct

    @staticmethod
    @once_differentiable  # the gradients are not themselves differentiable: say so, loudly
    def backward(ctx, grad_loss_rows, *_unused):
        logits_rows, target_rows, lse = ctx.saved_tensors
        grad_logits = logits_rows if ctx.inplace else _empty_grad(logits_rows)
        ctx.impl.backward(logits_rows, target_rows, lse, grad_loss_rows, ctx.spec, grad_logits)
        return grad_logits, None, None, None, None


class _GradInForwardCrossEntropy(torch.autograd.Function):
    """A loss reduced to a scalar, whose gradient the forward sweep computes.

    The gradient each row gets from a ``"mean"`` or ``"sum"`` loss is known before
    ``backward()`` (``1 / tokens`` or 1, times the incoming scalar): the backend writes it while
    each chunk of logits is in the cache, so backward() reads no logits and computes no
    exponential; it only scales the buffer when the incoming gradient is not 1, and hands the
    buffer over (the graph keeps no reference, so autograd does not copy it). The peak memory is
    the same, logits plus one gradient buffer, held from the forward call instead.
    """

    @staticmethod
    def forward(ctx, logits_rows, target_rows, tokens, spec: LossSpec, impl: GradInForwardBackend):
        if spec.reduction == "mean":
            # the float64 quotient cast once, as autograd's gradient of _reduce would be
            weight = 1.0 / _mean_denominator(tokens, spec).to(torch.float64)
        else:
            weight = torch.ones((), dtype=torch.float64, device=tokens.device)
        grad_logits = _empty_grad(logits_rows)
        rows = impl.forward_with_grad(logits_rows, target_rows, spec, weight, grad_logits)
        ctx.save_for_backward(logits_rows, target_rows, rows.lse, weight)
        ctx.spec, ctx.impl, ctx.grad_logits = spec, impl, grad_logits
        ctx.mark_non_differentiable(rows.loss, rows.nll, rows.lse, rows.entropy, rows.correct)
        loss = _reduce(rows.loss, tokens, spec)
        return loss, rows.loss, rows.nll, rows.lse, rows.entropy, rows.correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        logits_rows, target_rows, lse, weight = ctx.saved_tensors
        grad_logits, ctx.grad_logits = ctx.grad_logits, None
        if grad_logits is None:  # a second backward() through a retained graph: recompute it
            grad_logits = _empty_grad(logits_rows)
            grad_rows = (grad_loss.to(torch.float64) * weight).to(lse.dtype).expand(lse.shape)
            ctx.impl.backward(logits_rows, target_rows, lse, grad_rows, ctx.spec, grad_logits)
        elif grad_loss.device.type != "cpu" or bool(grad_loss != 1):
            # on the CPU the comparison costs nothing; elsewhere it would be a host sync
            grad_logits.mul_(grad_loss)
        return grad_logits, None, None, None, None


def _empty_grad(logits_rows: torch.Tensor) -> torch.Tensor:
    """An uninitialised, contiguous gradient buffer of the logits' shape and dtype."""
    return torch.empty(logits_rows.shape, dtype=logits_rows.dtype, device=logits_rows.device)


def _check_per_sequence(per_sequence_stats: bool, target: torch.Tensor) -> None:
    if not isinstance(per_sequence_stats, bool):
        raise TypeError(f"per_sequence_stats must be True or False, got {per_sequence_stats!r}")
    if per_sequence_stats and isinstance(target, torch.Tensor) and target.dim() < 1:
        raise ValueError(
            "per_sequence_stats=True needs a sequence axis: target must have at least one "
            f"dimension, got shape {tuple(target.shape)}"
        )


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A ``[outer, inner, V]`` view of ``logits``, vocabulary stride 1 (a copy if none exists).

    Two row strides cover contiguous tensors and the usual slices (``logits[:, :-1]``,
    ``logits[..., :V]`` of a padded vocabulary) without a copy.
    """
    vocab = logits.shape[-1]
    if logits.stride(-1) == 1:
        lead = logits.shape[:-1]
        for split in range(len(lead) + 1):
            try:
                return logits.view(math.prod(lead[:split]), math.prod(lead[split:]), vocab)
            except RuntimeError:
                continue
    return logits.contiguous().view(1, -1, vocab)


def _shift_left(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target[..., t + 1]`` at ``t``, ``ignore_index`` at the last position (same shape)."""
    if target.shape[-1] == 0:  # no positions: nothing to shift, and no last one to pad
        return target
    pad = target.new_full((*target.shape[:-1], 1), ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def _check_logits_and_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """The tensors of :func:`cross_entropy`: types, dtypes, shapes and device."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, float16, bfloat16 or float64, got dtype {logits.dtype}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor of class indices, got dtype {target.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError(
            "logits must have at least one dimension (the vocabulary), got a 0-d tensor"
        )
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits.shape[-1] (the vocabulary) must not be 0, got shape {tuple(logits.shape)}"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target.shape {tuple(target.shape)} must equal logits.shape[:-1] "
            f"{tuple(logits.shape[:-1])} (logits.shape is {tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(
            f"target is on {target.device} but logits are on {logits.device}: use one device"
        )


def _check_shift(spec: LossSpec, target: torch.Tensor) -> None:
    """The one check of the options that needs the target: ``shift=True`` needs a sequence axis."""
    if spec.shift and target.dim() < 1:
        raise ValueError(
            f"shift=True needs a sequence axis: target must have at least one dimension, "
            f"got shape {tuple(target.shape)}"
        )


def _check_target_values(
    target: torch.Tensor,
    vocab: int,
    ignore_index: int,
    *,
    shifted: bool,
    vocab_from: str = "logits.shape[-1]",
) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if not bool(bad.any()):
        return
    position = tuple(int(i) for i in torch.nonzero(bad)[0])
    value = int(target[position])
    if shifted:  # report the index in the caller's (unshifted) target
        position = (*position[:-1], position[-1] + 1)
    where = f"target[{', '.join(map(str, position))}]"
    if value < 0:
        raise ValueError(f"{where} = {value} is negative and is not ignore_index ({ignore_index})")
    raise ValueError(
        f"{where} = {value} is out of range for a vocabulary of {vocab} ({vocab_from}): "
        f"class indices must be in [0, {vocab - 1}] or equal ignore_index ({ignore_index})"
    )
