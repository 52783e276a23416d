"""Triton kernels of the fused linear cross-entropy: logits only ever exist as register tiles.

Forward, one program per block of tokens and split of the vocabulary (enough splits that the GPU
is full even for few tokens): for each vocabulary block the logits tile is computed by ``tl.dot``
over the hidden dimension and folded into a running max, sum of exponentials, entropy term,
argmax and true-class logit per token (online log-sum-exp). Only these per-token partials are
stored, and merged across splits by a few device ops.

Backward, one program per (token block, vocabulary block) tile: the logits tile is recomputed,
turned into its gradient with the saved log-sum-exp, and multiplied out into the hidden and
weight gradients, which are accumulated with float32 atomics (the weight gradient is a float32
buffer whatever the weight's dtype).

Ignored tokens are moved behind the scored ones by a stable sort on the device and the number of
scored tokens is read by the kernels, so blocks of ignored tokens exit at once and no host sync
is needed. Values are float32 after loading; the matmuls run in the inputs' dtype on a GPU (full
float32 precision for float32 inputs) and in float32 under the interpreter. The math (online
log-sum-exp, the row gradient, the softcap) is in ``_math.py``, derived there and shared with the
cross-entropy kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lossplug.ops._spec import LinearGrads, LossSpec, NeededGrads, RowOutputs
from lossplug.ops._triton._math import _lse_update, _row_grad, _softcap
from lossplug.ops._triton.cross_entropy import INTERPRETED, softcap_args, warps

PRECOMPUTES_GRAD = False


def launch_params(
    dtype: torch.dtype = torch.bfloat16, *, interpreted: bool = INTERPRETED
) -> dict[str, int]:
    """Tiles, warps and pipeline stages of both kernels (``GROUP`` is the backward's alone).

    The one place they are chosen: the launches below and ``benchmarks/gpu_compile.py`` (which
    compiles for real GPUs what these launches would run) both call it.

    Args:
        dtype: the dtype of the hidden states and weight (the matmuls' inputs).
        interpreted: for the interpreter (no ``num_warps``) rather than a GPU.
    """
    # the smallest tiles that tl.dot accepts under the interpreter (16), whatever the dtype
    if interpreted:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, GROUP=4)
    # Moderate on a GPU: register pressure of the [BLOCK_N, BLOCK_V] float32 tile plus the
    # dot operands. Chosen so that every specialization compiles with no spills on sm_80 and
    # sm_90 (benchmarks/gpu_compile.py checks it), not tuned for speed:
    # - 16-bit inputs: BLOCK_D=64 spilled 48-56 bytes on sm_80 when both the hidden and the
    #   weight gradient are wanted (255 registers); BLOCK_D=32 fits both archs.
    # - float32 inputs: the dots run on FP32 units, not tensor cores, with the operands in
    #   registers; BLOCK_D=64 spilled 32-7144 bytes on both archs, BLOCK_D=16 with 3 stages
    #   216 in the sm_90 backward and with 2 stages still 16 (sm_90, bias gradient alone);
    #   BLOCK_D=8 with 2 pipeline stages fits every specialization on both archs.
    tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP=8)
    if dtype == torch.float32:
        tiles.update(BLOCK_D=8, num_stages=2)
    return {**tiles, **warps(interpreted)}


# The forward splits the vocabulary until about this many programs run (a few per GPU core).
TARGET_PROGRAMS = 1024


@triton.jit
def _load_rows(row_ptrs, row_mask, d, d_mask, DOT_FP32: tl.constexpr):
    """The ``[R, BLOCK_D]`` tile at columns ``d`` of the rows that ``row_ptrs`` (``[R, 1]``) point
    to, 0 where masked: an operand of ``tl.dot`` (float32 when ``DOT_FP32``)."""
    tile = tl.load(row_ptrs + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _token_rows(order_ptr, target_ptr, first, n_active, BLOCK_N: tl.constexpr):
    """The ``BLOCK_N`` scored tokens from slot ``first`` of the order on: their rows, the mask of
    the slots before ``n_active``, and their targets."""
    slots = first + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = slots < n_active
    rows = tl.load(order_ptr + slots, mask=row_mask, other=0)
    return rows, row_mask, tl.load(target_ptr + rows, mask=row_mask, other=0)


@triton.jit
def _logits_tile(
    h_ptrs,  # [BLOCK_N, 1]: the tile's rows of hidden
    row_mask,  # [BLOCK_N]
    w_ptrs,  # [BLOCK_V, 1]: the tile's rows of weight (one per vocabulary column)
    cols,  # [BLOCK_V]: the tile's vocabulary columns
    col_mask,  # [BLOCK_V]
    bias_ptr,  # [V], read only when HAS_BIAS
    dim,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The float32 ``[BLOCK_N, BLOCK_V]`` logits tile (soft-capped when asked)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    for k in range(0, dim, BLOCK_D):
        d = k + offs_d
        d_mask = d < dim
        h = _load_rows(h_ptrs, row_mask, d, d_mask, DOT_FP32)
        w = _load_rows(w_ptrs, col_mask, d, d_mask, DOT_FP32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    return acc


@triton.jit
def _lce_forward_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]
    bias_ptr,  # [V]
    target_ptr,  # [N]
    order_ptr,  # [N]: the rows, scored ones first
    n_active_ptr,  # [1]: how many rows are scored
    part_ptr,  # [6, splits, N] float32
    n_rows,
    vocab,
    split_cols,
    dim,
    stride_h,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial results of one block of tokens over one split of the vocabulary.

    ``part_ptr`` holds, per split and row: running max, sum of exponentials and entropy term
    (both relative to that max), sum of logits, argmax and true-class logit.
    """
    n_active = tl.load(n_active_ptr)
    first = tl.program_id(0).to(tl.int64) * BLOCK_N
    split = tl.program_id(1).to(tl.int64)
    if first < n_active:
        rows, row_mask, y = _token_rows(order_ptr, target_ptr, first, n_active, BLOCK_N)
        h_ptrs = hidden_ptr + rows[:, None] * stride_h
        offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
        run_max = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ e^(z - run_max) (z - run_max)
        run_zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        run_arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
        z_true = tl.zeros((BLOCK_N,), dtype=tl.float32)
        col_first = split * split_cols
        col_stop = tl.minimum(col_first + split_cols, vocab)
        for start in range(col_first, col_stop, BLOCK_V):
            cols = start + offs_v
            col_mask = cols < col_stop
            z = _logits_tile(
                h_ptrs=h_ptrs,
                row_mask=row_mask,
                w_ptrs=weight_ptr + cols[:, None] * stride_w,
                cols=cols,
                col_mask=col_mask,
                bias_ptr=bias_ptr,
                dim=dim,
                softcap=softcap,
                HAS_BIAS=HAS_BIAS,
                HAS_SOFTCAP=HAS_SOFTCAP,
                DOT_FP32=DOT_FP32,
                DOT_PRECISION=DOT_PRECISION,
                BLOCK_N=BLOCK_N,
                BLOCK_V=BLOCK_V,
                BLOCK_D=BLOCK_D,
            )
            z_true += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
            run_zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            z = tl.where(col_mask[None, :], z, -float("inf"))
            run_max, run_sum, run_ent, run_arg = _lse_update(
                run_max, run_sum, run_ent, run_arg, z, start
            )
        plane = tl.num_programs(1).to(tl.int64) * n_rows
        out = part_ptr + split * n_rows + rows
        tl.store(out, run_max, mask=row_mask)
        tl.store(out + plane, run_sum, mask=row_mask)
        tl.store(out + 2 * plane, run_ent, mask=row_mask)
        tl.store(out + 3 * plane, run_zsum, mask=row_mask)
        tl.store(out + 4 * plane, run_arg.to(tl.float32), mask=row_mask)
        tl.store(out + 5 * plane, z_true, mask=row_mask)


@triton.jit
def _lce_backward_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]
    bias_ptr,  # [V]
    target_ptr,  # [N]
    order_ptr,  # [N]: the rows, scored ones first
    n_active_ptr,  # [1]: how many rows are scored
    lse_ptr,  # [N] float32
    grad_rows_ptr,  # [N] float32: the incoming gradient of each row's loss
    grad_h_ptr,  # [N, D] float32, written only when WANT_H
    grad_w_ptr,  # [V, D] float32, written only when WANT_W
    grad_b_ptr,  # [V] float32, written only when WANT_B
    n_rows,
    vocab,
    dim,
    stride_h,
    stride_w,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_H: tl.constexpr,
    WANT_W: tl.constexpr,
    WANT_B: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
):
    # grouped order: programs running together share weight tiles in the L2 cache
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(n_rows, BLOCK_N)
    n_blocks_v = tl.cdiv(vocab, BLOCK_V)
    per_group = GROUP * n_blocks_v
    group_first = (pid // per_group) * GROUP
    group_size = tl.minimum(n_blocks_n - group_first, GROUP)
    block_n = group_first + (pid % per_group) % group_size
    block_v = (pid % per_group) // group_size

    n_active = tl.load(n_active_ptr)
    first = block_n.to(tl.int64) * BLOCK_N
    if first < n_active:
        rows, row_mask, y = _token_rows(order_ptr, target_ptr, first, n_active, BLOCK_N)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(grad_rows_ptr + rows, mask=row_mask, other=0.0)
        cols = block_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < vocab
        h_ptrs = hidden_ptr + rows[:, None] * stride_h
        w_ptrs = weight_ptr + cols[:, None] * stride_w
        z = _logits_tile(
            h_ptrs=h_ptrs,
            row_mask=row_mask,
            w_ptrs=w_ptrs,
            cols=cols,
            col_mask=col_mask,
            bias_ptr=bias_ptr,
            dim=dim,
            softcap=softcap,
            HAS_BIAS=HAS_BIAS,
            HAS_SOFTCAP=HAS_SOFTCAP,
            DOT_FP32=DOT_FP32,
            DOT_PRECISION=DOT_PRECISION,
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
            BLOCK_D=BLOCK_D,
        )
        grad = _row_grad(z, cols, y, lse, g, label_smoothing, z_loss, vocab, softcap, HAS_SOFTCAP)
        grad = tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)
        if WANT_B:
            tl.atomic_add(grad_b_ptr + cols, tl.sum(grad, axis=0), mask=col_mask)
        if DOT_FP32:  # noqa: SIM108 (a compile-time branch of the kernel)
            grad_dot = grad
        else:
            grad_dot = grad.to(hidden_ptr.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        for k in range(0, dim, BLOCK_D):
            d = k + offs_d
            d_mask = d < dim
            if WANT_H:
                w = _load_rows(w_ptrs, col_mask, d, d_mask, DOT_FP32)
                part_h = tl.dot(grad_dot, w, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    grad_h_ptr + rows[:, None] * dim + d[None, :],
                    part_h,
                    mask=row_mask[:, None] & d_mask[None, :],
                )
            if WANT_W:
                h = _load_rows(h_ptrs, row_mask, d, d_mask, DOT_FP32)
                part_w = tl.dot(tl.trans(grad_dot), h, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    grad_w_ptr + cols[:, None] * dim + d[None, :],
                    part_w,
                    mask=col_mask[:, None] & d_mask[None, :],
                )


def _order(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices with the scored rows first, and their count (a 1-element device tensor)."""
    active = target != ignore_index
    order = torch.argsort((~active).to(torch.int8), stable=True)
    return order, active.sum(dtype=torch.int32).reshape(1)


def _shared_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    spec: LossSpec,
    params: dict,
) -> dict:
    """The arguments both kernels take, by name: the inputs, the order of the rows, the sizes,
    the constexprs and the launch options of ``params`` (``GROUP`` is the backward's alone)."""
    order, n_active = _order(target, spec.ignore_index)
    return dict(
        hidden_ptr=hidden,
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else hidden,  # not read without HAS_BIAS
        target_ptr=target,
        order_ptr=order,
        n_active_ptr=n_active,
        n_rows=hidden.shape[0],
        vocab=weight.shape[0],
        dim=hidden.shape[1],
        stride_h=hidden.stride(0),
        stride_w=weight.stride(0),
        HAS_BIAS=bias is not None,
        DOT_FP32=INTERPRETED,
        # float32 inputs get full float32 products, not tf32's 10-bit mantissas; the setting
        # changes nothing for 16-bit inputs, nor under the interpreter
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 and not INTERPRETED else "tf32",
        **softcap_args(spec),
        **{k: v for k, v in params.items() if k != "GROUP"},
    )


def _splits(n_rows: int, vocab: int, block_n: int, block_v: int) -> int:
    """Vocabulary splits so that a few programs per GPU core run even for few tokens."""
    blocks_v = triton.cdiv(vocab, block_v)
    return max(1, min(blocks_v, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n_rows, block_n))))


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    needs: NeededGrads | None,
) -> tuple[RowOutputs, LinearGrads | None]:
    """Per-row outputs; the gradients are left to :func:`backward` (``needs`` is ignored)."""
    del needs
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    device = hidden.device
    if n_rows == 0:
        # one tensor each: autograd marks the statistics non-differentiable, not the loss
        empty = [torch.zeros(0, dtype=torch.float32, device=device) for _ in range(4)]
        return RowOutputs(*empty, torch.zeros(0, dtype=torch.int32, device=device)), None
    params = launch_params(hidden.dtype)
    block_n, block_v = params["BLOCK_N"], params["BLOCK_V"]
    splits = _splits(n_rows, vocab, block_n, block_v)
    split_cols = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, split_cols)  # every split holds at least one column
    parts = torch.zeros(6, splits, n_rows, dtype=torch.float32, device=device)
    _lce_forward_kernel[(triton.cdiv(n_rows, block_n), splits)](
        part_ptr=parts,
        split_cols=split_cols,
        **_shared_args(hidden, weight, bias, target, spec, params),
    )
    return _combine(parts, target, vocab, spec), None


def _combine(parts: torch.Tensor, target: torch.Tensor, vocab: int, spec: LossSpec) -> RowOutputs:
    """Merge the per-split partials into the row outputs (device ops, no host sync)."""
    part_max, part_sum, part_ent, part_zsum, part_arg, part_true = parts
    run_max = part_max.amax(dim=0)
    # rows no program wrote (ignored ones) hold zeros here and are zeroed again at the end
    shift = (part_max - run_max).nan_to_num(nan=0.0, neginf=-torch.inf)
    scale = torch.exp(shift)
    run_sum = (part_sum * scale).sum(dim=0)
    run_ent = (scale * (part_ent + part_sum * shift)).sum(dim=0)
    log_sum = torch.log(run_sum)
    lse = run_max + log_sum
    # (max - z_y) + log Σ: lse rounded to float32 at the logits' magnitude would carry its
    # rounding (7.6e-6 at 77) into a confident row's small loss
    nll = (run_max - part_true.sum(dim=0)) + log_sum
    z_mean = part_zsum.sum(dim=0) / vocab if spec.label_smoothing > 0 else None
    entropy = log_sum - run_ent / run_sum
    # the first split reaching the maximum holds the first argmax
    first_split = (part_max == run_max).to(torch.int8).argmax(dim=0, keepdim=True)
    argmax = part_arg.gather(0, first_split)[0].to(torch.int64)
    ignored, invalid, _ = spec.target_masks(target, vocab)
    rows = RowOutputs(
        spec.training_loss(nll, lse, z_mean), nll, lse, entropy, (argmax == target).to(torch.int32)
    )
    return rows.mask_(ignored, invalid)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    needs: NeededGrads,
) -> LinearGrads:
    """Gradients of ``Σ grad_rows * loss_rows``, in float32 (the op casts them to the inputs')."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    want_h, want_w, want_b = needs
    want_b = want_b and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros(n_rows, dim, **f32) if want_h else None
    grad_w = torch.zeros(vocab, dim, **f32) if want_w else None
    grad_b = torch.zeros(vocab, **f32) if want_b else None
    if n_rows > 0 and (want_h or want_w or want_b):
        params = launch_params(hidden.dtype)
        grid = (triton.cdiv(n_rows, params["BLOCK_N"]) * triton.cdiv(vocab, params["BLOCK_V"]),)
        _lce_backward_kernel[grid](
            lse_ptr=lse,
            grad_rows_ptr=grad_rows.to(torch.float32).contiguous(),
            # an unwanted gradient's pointer is never written: any float32 tensor stands in
            grad_h_ptr=grad_h if grad_h is not None else lse,
            grad_w_ptr=grad_w if grad_w is not None else lse,
            grad_b_ptr=grad_b if grad_b is not None else lse,
            label_smoothing=spec.label_smoothing,
            z_loss=spec.z_loss,
            WANT_H=want_h,
            WANT_W=want_w,
            WANT_B=want_b,
            GROUP=params["GROUP"],
            **_shared_args(hidden, weight, bias, target, spec, params),
        )
    return LinearGrads(grad_h, grad_w, grad_b)
