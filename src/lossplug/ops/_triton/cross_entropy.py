"""Triton kernels of the fused cross-entropy: one online-softmax pass forward, one pass backward.

Forward, one program per row: a single sweep over vocabulary blocks keeps the running max, the
running sum of exponentials, the running entropy term, the running sum of logits (for label
smoothing) and the argmax; the true-class logit is read once. Ignored rows skip the sweep.
Backward, one program per row: recomputes the softmax from the saved log-sum-exp and writes
``softmax - onehot`` (with smoothing, z-loss and softcap terms) scaled by the incoming gradient.

Offsets are int64, so tensors with more than 2**31 elements work. Values are converted to float32
right after loading and back only when stored. The math (online log-sum-exp, the row gradient, the
softcap) is in ``_math.py``, derived there and shared with the linear kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lossplug.ops._spec import LossSpec, RowOutputs
from lossplug.ops._triton._math import _lse_entropy, _lse_update, _row_grad, _softcap

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The backward recomputes the softmax from the saved log-sum-exp rather than the forward writing
# a scalar loss's gradient: that saves one read of the logits only when the incoming gradient is
# 1, and costs a read and a write more when it is not (gradient accumulation, loss scaling),
# which only the backward knows (benchmarks/cost_model.py weighs both).
PRECOMPUTES_GRAD = False
# The interpreter pays per loop step, a GPU per register: large blocks there, moderate here.
MAX_BLOCK_V_INTERPRETED, MAX_BLOCK_V_GPU = 16384, 4096
NUM_WARPS = 8


@triton.jit
def _ce_forward_kernel(
    logits_ptr,  # [outer, inner, V], vocabulary stride 1
    target_ptr,  # [N] int64, N = outer * inner
    loss_ptr,  # [N] float32
    nll_ptr,  # [N] float32
    lse_ptr,  # [N] float32
    entropy_ptr,  # [N] float32
    correct_ptr,  # [N] int32
    n_inner,
    stride_outer,
    stride_inner,
    vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    y = tl.load(target_ptr + row)
    loss = 0.0
    nll = 0.0
    lse = 0.0
    entropy = 0.0
    correct = 0
    if y != ignore_index:
        invalid = (y < 0) | (y >= vocab)
        y_safe = tl.where(invalid, 0, y)
        z_true = tl.load(row_ptr + y_safe).to(tl.float32)
        if HAS_SOFTCAP:
            z_true = _softcap(z_true, softcap)
        offs = tl.arange(0, BLOCK_V).to(tl.int64)
        run_max = -float("inf")
        run_sum = 0.0
        run_ent = 0.0  # Σ e^(z - run_max) (z - run_max)
        run_zsum = 0.0
        run_arg = tl.zeros((), dtype=tl.int64)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            if HAS_SMOOTHING:
                run_zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, -float("inf"))
            run_max, run_sum, run_ent, run_arg = _lse_update(
                run_max, run_sum, run_ent, run_arg, z, start
            )
        lse, entropy = _lse_entropy(run_max, run_sum, run_ent)
        # (max - z_y) + log Σ, not lse - z_y: lse rounded to float32 at the logits' magnitude
        # (7.6e-6 at 77) would carry its rounding into a confident row's small loss
        nll = (run_max - z_true) + tl.log(run_sum)
        loss = nll
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - run_zsum / vocab)
        loss = loss + z_loss * lse * lse
        correct = tl.where((run_arg == y) & ~invalid, 1, 0)
        nll = tl.where(invalid, float("nan"), nll)
        loss = tl.where(invalid, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    tl.store(nll_ptr + row, nll)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(correct_ptr + row, correct)


@triton.jit
def _ce_backward_kernel(
    logits_ptr,  # [outer, inner, V], vocabulary stride 1
    target_ptr,  # [N] int64, N = outer * inner
    lse_ptr,  # [N] float32
    grad_rows_ptr,  # [N] float32: the incoming gradient of each row's loss
    grad_ptr,  # [outer, inner, V], vocabulary stride 1: the logits' gradient
    n_inner,
    stride_outer,
    stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    row_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    grad_row_ptr = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    y = tl.load(target_ptr + row)
    offs = tl.arange(0, BLOCK_V).to(tl.int64)
    if y == ignore_index:
        zeros = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            tl.store(grad_row_ptr + cols, zeros.to(grad_ptr.dtype.element_ty), mask=cols < vocab)
    else:
        g = tl.load(grad_rows_ptr + row).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offs
            mask = cols < vocab
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            grad = _row_grad(
                z, cols, y, lse, g, label_smoothing, z_loss, vocab, softcap, HAS_SOFTCAP
            )
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def launch_params(vocab: int, *, interpreted: bool = INTERPRETED) -> dict[str, int]:
    """The block size and warps both kernels are launched with for rows of ``vocab`` logits.

    The one place they are chosen: the launches below and ``benchmarks/gpu_compile.py`` (which
    compiles for real GPUs what these launches would run) both call it.

    Args:
        vocab: the number of classes.
        interpreted: for the interpreter (no ``num_warps``) rather than a GPU.
    """
    max_block = MAX_BLOCK_V_INTERPRETED if interpreted else MAX_BLOCK_V_GPU
    return {"BLOCK_V": min(triton.next_power_of_2(vocab), max_block), **warps(interpreted)}


def warps(interpreted: bool = INTERPRETED) -> dict[str, int]:
    """``num_warps`` of a GPU launch (the interpreter takes none)."""
    return {} if interpreted else {"num_warps": NUM_WARPS}


def softcap_args(spec: LossSpec) -> dict:
    """``softcap`` and ``HAS_SOFTCAP`` of a kernel launch (the cap is not read without it)."""
    return dict(
        softcap=spec.softcap if spec.softcap is not None else 1.0,
        HAS_SOFTCAP=spec.softcap is not None,
    )


def _shared_args(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> dict:
    """The arguments both kernels take, by name, and the launch options."""
    vocab = logits.shape[2]
    return dict(
        logits_ptr=logits,
        target_ptr=target,
        n_inner=logits.shape[1],
        stride_outer=logits.stride(0),
        stride_inner=logits.stride(1),
        vocab=vocab,
        ignore_index=spec.ignore_index,
        label_smoothing=spec.label_smoothing,
        z_loss=spec.z_loss,
        **softcap_args(spec),
        **launch_params(vocab),
    )


def forward(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> RowOutputs:
    """The per-row outputs of ``logits`` ``[outer, inner, V]`` against ``target`` ``[N]``."""
    n_rows = logits.shape[0] * logits.shape[1]
    f32 = dict(dtype=torch.float32, device=logits.device)
    loss, nll, lse, entropy = (torch.empty(n_rows, **f32) for _ in range(4))
    correct = torch.empty(n_rows, dtype=torch.int32, device=logits.device)
    if n_rows > 0:
        _ce_forward_kernel[(n_rows,)](
            loss_ptr=loss,
            nll_ptr=nll,
            lse_ptr=lse,
            entropy_ptr=entropy,
            correct_ptr=correct,
            HAS_SMOOTHING=spec.label_smoothing > 0,
            **_shared_args(logits, target, spec),
        )
    return RowOutputs(loss, nll, lse, entropy, correct)


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    grad_logits: torch.Tensor,
) -> None:
    """Write ``grad_rows * d loss_rows / d logits`` into ``grad_logits`` (``logits``' shape)."""
    n_rows = logits.shape[0] * logits.shape[1]
    if n_rows == 0:
        return
    _ce_backward_kernel[(n_rows,)](
        lse_ptr=lse,
        grad_rows_ptr=grad_rows.to(torch.float32).contiguous(),
        grad_ptr=grad_logits,
        grad_stride_outer=grad_logits.stride(0),
        grad_stride_inner=grad_logits.stride(1),
        **_shared_args(logits, target, spec),
    )
