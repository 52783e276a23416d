"""Chunked PyTorch path of the fused linear cross-entropy: any device, bounded extra memory.

Tokens are processed a chunk of rows at a time (512 rows, or 32 MiB of logits where that is more):
the chunk's logits are computed into a float32 workspace by one matmul, scored a cache-sized block
of rows at a time by the cross-entropy path's code, turned into their gradient in place and
multiplied back out into the gradients of the hidden states, the weight and the bias. The full
``[N, V]`` logits never exist; the extra memory is the chunk workspace, two block-sized ones and
the float32 weight-gradient accumulator, none of which grows with the number of tokens. float64
inputs are computed in float64 throughout (workspaces and accumulators included).

When the loss is reduced to a scalar its gradient is known up to one factor in the forward pass,
so the gradients are computed there (three matmuls in all, the minimum) and only scaled in the
backward. Per-token losses (``reduction="none"``) recompute the logits in the backward instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from lossplug.ops._spec import LinearGrads, LossSpec, RowOutputs
from lossplug.ops._torch.cross_entropy import (
    compute_dtype,
    grad_coefficients,
    probs_to_grad_,
    run_chunks,
    score_chunk,
    softcap_,
)

#: Bytes of the float32 chunk of logits the matmuls work on. Larger chunks make the weight-gradient
#: update (which reads and writes all of ``[V, D]`` once per chunk) rarer and the matmuls more
#: efficient; smaller ones use less memory.
WORKSPACE_BYTES = 32 * 2**20
#: Fewest rows in a chunk whatever the vocabulary: the logits matmul loses a fifth of its speed at
#: 256 rows on a CPU, and below that the weight-gradient update, not the matmuls, sets the time.
MIN_CHUNK_ROWS = 512
#: Bytes of the half-precision slices of the weight gradient that are added into its float32
#: accumulator one at a time.
SLICE_BYTES = 8 * 2**20
#: Bytes of the blocks of rows the element-wise passes work on, so that they run in the cache
#: (a second workspace of this size holds their log-probabilities).
BLOCK_BYTES = 2 * 2**20

PRECOMPUTES_GRAD = True


def _rows_per_chunk(vocab: int, n_rows: int, itemsize: int = 4) -> int:
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, WORKSPACE_BYTES // (itemsize * vocab))))


def _fields(outputs: RowOutputs) -> tuple[torch.Tensor, ...]:
    return outputs.loss, outputs.nll, outputs.lse, outputs.entropy, outputs.correct


def _rows_per_block(vocab: int, rows_per_chunk: int, itemsize: int = 4) -> int:
    return max(1, min(rows_per_chunk, BLOCK_BYTES // (itemsize * vocab)))


def _score_block(
    z: torch.Tensor,
    target: torch.Tensor,
    g: torch.Tensor | None,
    spec: LossSpec,
    bias_z: torch.Tensor | None,
    log_probs_buf: torch.Tensor,
    dtanh_buf: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Row outputs of a block of logits ``z`` (float32, or float64 for float64 inputs); with
    ``g``, ``z`` becomes its gradient."""
    if bias_z is not None:
        z.add_(bias_z)
    dtanh = None
    if spec.softcap is not None:
        dtanh = softcap_(z, spec.softcap, dtanh_buf if g is not None else None)
    # the softmax lands back in the logits' memory
    row_loss, row_nll, row_lse, row_entropy, row_correct = score_chunk(
        z, target, spec, log_probs_buf, z, want_probs=g is not None
    )
    if g is not None:
        prob_scale, true_delta, uniform_delta = grad_coefficients(g, row_lse, spec, z.shape[1])
        probs_to_grad_(z, target[:, None], prob_scale, true_delta, uniform_delta, dtanh)
    return row_loss, row_nll, row_lse, row_entropy, row_correct


def _score_blocks(
    z: torch.Tensor,
    target: torch.Tensor,
    g: torch.Tensor | None,
    spec: LossSpec,
    bias_z: torch.Tensor | None,
    chunk_rows: list[torch.Tensor],
    rows_per_block: int,
) -> None:
    """:func:`_score_block` over the chunk ``z`` a block of rows at a time, its row outputs
    written into ``chunk_rows``; on a CPU the blocks are shared out among torch's threads (see
    :func:`~lossplug.ops._torch.cross_entropy.run_chunks`), each with workspaces of its own."""
    rows, vocab = z.shape
    fp = dict(dtype=z.dtype, device=z.device)
    with_dtanh = g is not None and spec.softcap is not None

    def work(blocks: Iterable[tuple[int, int]]) -> None:
        log_probs_buf = torch.empty(rows_per_block, vocab, **fp)
        dtanh_buf = torch.empty(rows_per_block, vocab, **fp) if with_dtanh else None
        for b0, b1 in blocks:
            block_rows = _score_block(
                z[b0:b1],
                target[b0:b1],
                None if g is None else g[b0:b1],
                spec,
                bias_z,
                log_probs_buf[: b1 - b0],
                None if dtanh_buf is None else dtanh_buf[: b1 - b0],
            )
            for out, value in zip(chunk_rows, block_rows, strict=True):
                out[b0:b1] = value

    blocks = [(b0, min(b0 + rows_per_block, rows)) for b0 in range(0, rows, rows_per_block)]
    run_chunks(work, blocks, z.device, z.numel())


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    needs: tuple[bool, bool, bool] | None,
) -> tuple[RowOutputs, LinearGrads | None]:
    """Per-row outputs and, when ``needs`` is given, the gradients of the summed row losses."""
    return _run(hidden, weight, bias, target, spec, grad_rows=None, needs=needs)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    needs: tuple[bool, bool, bool],
) -> LinearGrads:
    """Gradients of ``Σ grad_rows * loss_rows``, recomputing the logits chunk by chunk."""
    del lse  # the recomputed chunk gives it again, exactly
    # the statistics came with the forward pass: no argmax or entropy again here
    nll_only = dataclasses.replace(spec, full_stats=False)
    _, grads = _run(hidden, weight, bias, target, nll_only, grad_rows=grad_rows, needs=needs)
    return grads


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    spec: LossSpec,
    *,
    grad_rows: torch.Tensor | None,
    needs: tuple[bool, bool, bool] | None,
) -> tuple[RowOutputs, LinearGrads | None]:
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    compute = compute_dtype(weight.dtype)
    fp = dict(dtype=compute, device=device)
    outputs = RowOutputs(
        loss=torch.zeros(n_rows, **fp),
        nll=torch.zeros(n_rows, **fp),
        lse=torch.zeros(n_rows, **fp),
        entropy=torch.zeros(n_rows, **fp),
        correct=torch.zeros(n_rows, dtype=torch.int32, device=device),
    )
    want_h, want_w, want_b = needs if needs is not None else (False, False, False)
    want_b = want_b and bias is not None
    grad_h = torch.zeros_like(hidden) if want_h else None
    grad_w = torch.zeros(vocab, dim, **fp) if want_w else None
    grad_b = torch.zeros(vocab, **fp) if want_b else None
    with_grads = want_h or want_w or want_b

    ignored, invalid, target_safe = spec.target_masks(target, vocab)
    # Ignored tokens never reach a matmul. Finding them costs a host sync, free on the CPU; on
    # other devices they are computed and zeroed instead, so the path stays sync-free there.
    if device.type == "cpu":
        active = torch.nonzero(~ignored).squeeze(1)
        if active.numel() == n_rows:
            active = None
    else:
        active = None
    n_active = n_rows if active is None else active.numel()
    grads = LinearGrads(grad_h, grad_w, grad_b) if with_grads else None
    if n_active == 0 or n_rows == 0:
        return outputs, grads

    rows_per_chunk = _rows_per_chunk(vocab, n_active, compute.itemsize)
    rows_per_block = _rows_per_block(vocab, rows_per_chunk, compute.itemsize)
    logits_buf = torch.empty(rows_per_chunk, vocab, **fp)
    bias_z = None if bias is None else bias.to(compute)
    direct = weight.dtype == compute
    if not direct:
        lowp_buf = torch.empty(rows_per_chunk, vocab, dtype=weight.dtype, device=device)
        slice_rows = max(1, min(vocab, SLICE_BYTES // (weight.element_size() * dim)))
        slice_buf = torch.empty(slice_rows, dim, dtype=weight.dtype, device=device)
    if with_grads:
        g_rows = (
            torch.ones(n_rows, **fp) if grad_rows is None else grad_rows.to(compute)
        ).masked_fill(ignored, 0.0)

    for start in range(0, n_active, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_active)
        rows = stop - start
        index = None if active is None else active[start:stop]
        h = hidden[start:stop] if index is None else hidden.index_select(0, index)
        y = target_safe[start:stop] if index is None else target_safe.index_select(0, index)
        g = None
        if with_grads:
            g = g_rows[start:stop] if index is None else g_rows.index_select(0, index)

        z = logits_buf[:rows]
        if direct:
            torch.mm(h, weight.t(), out=z)
        else:  # the matmul in the input dtype (as the model's own head), scored in float32
            z.copy_(torch.mm(h, weight.t(), out=lowp_buf[:rows]))
        chunk_rows = [torch.empty(rows, **fp) for _ in range(4)]
        chunk_rows.append(torch.empty(rows, dtype=torch.int32, device=device))
        # The element-wise work runs a few rows at a time, so its many passes hit the cache
        # while the matmuls get the whole chunk; it leaves the logits' gradient in place.
        _score_blocks(z, y, g, spec, bias_z, chunk_rows, rows_per_block)
        for out, value in zip(_fields(outputs), chunk_rows, strict=True):
            if index is None:
                out[start:stop] = value
            else:
                out.index_copy_(0, index, value)
        if not with_grads:
            continue

        # half-precision inputs: both gradient matmuls in their dtype (as the model's own head's
        # backward), the weight gradient added up in float32 a slice of the vocabulary at a time
        grad_z = z if direct else lowp_buf[:rows].copy_(z)
        if grad_h is not None:
            chunk_grad_h = torch.mm(grad_z, weight)
            if index is None:
                grad_h[start:stop] = chunk_grad_h
            else:
                grad_h.index_copy_(0, index, chunk_grad_h)
        if grad_w is not None and direct:
            grad_w.addmm_(grad_z.t(), h)
        elif grad_w is not None:
            for v0 in range(0, vocab, slice_rows):
                v1 = min(v0 + slice_rows, vocab)
                part = torch.mm(grad_z[:, v0:v1].t(), h, out=slice_buf[: v1 - v0])
                grad_w[v0:v1].add_(part)
        if grad_b is not None:
            grad_b.add_(z.sum(dim=0))

    return outputs.mask_(ignored, invalid), grads
