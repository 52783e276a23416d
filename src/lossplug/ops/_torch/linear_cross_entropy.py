"""Chunked PyTorch path of the fused linear cross-entropy: any device, bounded extra memory.

Tokens are processed a chunk of rows at a time (512 rows, or 32 MiB of logits where that is more):
the chunk's logits are computed into a float32 workspace by one matmul, scored a cache-sized block
of rows at a time by the cross-entropy path's code, turned into their gradient in place and
multiplied back out into the gradients of the hidden states, the weight and the bias. The full
``[N, V]`` logits never exist; the extra memory is the chunk workspace (and its copy in the
inputs' dtype for half-precision inputs), one or two block-sized ones per thread and the float32
weight-gradient accumulator, none of which grows with the number of tokens. float64 inputs are
computed in float64 throughout (workspaces and accumulators included).

When the loss is reduced to a scalar its gradient is known up to one factor in the forward pass,
so the gradients are computed there (three matmuls in all, the minimum) and only scaled in the
backward. Per-token losses (``reduction="none"``) recompute the logits in the backward instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import NamedTuple

import torch

from lossplug.ops._spec import LinearGrads, LossSpec, NeededGrads, RowOutputs
from lossplug.ops._torch.cross_entropy import (
    compute_dtype,
    run_chunks,
    score_chunk,
    score_chunk_with_grad,
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


def _rows_per_block(vocab: int, rows_per_chunk: int, itemsize: int = 4) -> int:
    return max(1, min(rows_per_chunk, BLOCK_BYTES // (itemsize * vocab)))


def _score_blocks(
    z: torch.Tensor,
    target: torch.Tensor,
    g: torch.Tensor | None,
    spec: LossSpec,
    bias_z: torch.Tensor | None,
    chunk_rows: list[torch.Tensor],
    rows_per_block: int,
) -> None:
    """The row outputs of the chunk of logits ``z`` (float32, or float64 for float64 inputs),
    written into ``chunk_rows``; with ``g``, ``z`` becomes its gradient.

    A block of rows at a time, so that the many element-wise passes run in the cache; on a CPU
    the blocks are shared out among torch's threads (see
    :func:`~lossplug.ops._torch.cross_entropy.run_chunks`), each with workspaces of its own.
    """
    rows, vocab = z.shape
    fp = dict(dtype=z.dtype, device=z.device)
    with_dtanh = g is not None and spec.softcap is not None

    def work(blocks: Iterable[tuple[int, int]]) -> None:
        log_probs_buf = torch.empty(rows_per_block, vocab, **fp)
        dtanh_buf = torch.empty(rows_per_block, vocab, **fp) if with_dtanh else None
        for b0, b1 in blocks:
            z_block, y_block, log_probs = z[b0:b1], target[b0:b1], log_probs_buf[: b1 - b0]
            if bias_z is not None:
                z_block.add_(bias_z)
            dtanh = None
            if spec.softcap is not None:
                dtanh_out = None if dtanh_buf is None else dtanh_buf[: b1 - b0]
                dtanh = softcap_(z_block, spec.softcap, dtanh_out)
            if g is None:
                values = score_chunk(z_block, y_block, spec, log_probs, z_block)
            else:
                # one exponential per logit for the statistics and the gradient, which lands
                # back in the logits' memory (z - max too, when no statistics need it beside
                # the exponentials)
                shifted = log_probs if spec.full_stats else z_block
                values = score_chunk_with_grad(
                    z_block, y_block, g[b0:b1], spec, shifted, z_block, dtanh
                )
            for out, value in zip(chunk_rows, values, strict=True):
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
    needs: NeededGrads | None,
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
    needs: NeededGrads,
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
    needs: NeededGrads | None,
) -> tuple[RowOutputs, LinearGrads | None]:
    """The row outputs of ``hidden [N, D] @ weight.T [D, V] (+ bias)`` and, when ``needs`` asks,
    the gradients of ``Σ grad_rows * loss_rows`` (``grad_rows`` ``None``: all ones).

    A chunk of active rows at a time: its logits by one matmul (:func:`_chunk_logits`), scored
    and turned into their gradient in place a block of rows at a time (:func:`_score_blocks`),
    then multiplied back out into the gradients (:func:`_accumulate_grads`).
    """
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    compute = compute_dtype(weight.dtype)
    fp = dict(dtype=compute, device=hidden.device)
    outputs = RowOutputs(
        loss=torch.zeros(n_rows, **fp),
        nll=torch.zeros(n_rows, **fp),
        lse=torch.zeros(n_rows, **fp),
        entropy=torch.zeros(n_rows, **fp),
        correct=torch.zeros(n_rows, dtype=torch.int32, device=hidden.device),
    )
    grads = _zero_grads(hidden, weight, bias, needs, compute)
    ignored, invalid, target_safe = spec.target_masks(target, vocab)
    active = _active_rows(ignored)
    n_active = n_rows if active is None else active.numel()
    if n_active == 0 or n_rows == 0:
        return outputs, grads

    work = _Workspace.allocate(weight, n_active, compute)
    bias_z = None if bias is None else bias.to(compute)
    g_rows = None
    if grads is not None:  # the weight of each row's loss; 0 at ignored rows
        g_rows = (
            torch.ones(n_rows, **fp) if grad_rows is None else grad_rows.to(compute)
        ).masked_fill(ignored, 0.0)

    for start in range(0, n_active, work.rows_per_chunk):
        stop = min(start + work.rows_per_chunk, n_active)
        chunk = _ChunkRows(start, stop, None if active is None else active[start:stop])
        h = chunk.take(hidden)
        y = chunk.take(target_safe)
        g = None if g_rows is None else chunk.take(g_rows)
        z = _chunk_logits(h, weight, work)
        chunk_rows = [torch.empty(chunk.count, **fp) for _ in range(4)]
        chunk_rows.append(torch.empty(chunk.count, dtype=torch.int32, device=hidden.device))
        # The element-wise work runs a few rows at a time, so its many passes hit the cache
        # while the matmuls get the whole chunk; it leaves the logits' gradient in place.
        _score_blocks(z, y, g, spec, bias_z, chunk_rows, work.rows_per_block)
        for out, value in zip(outputs.tensors(), chunk_rows, strict=True):
            chunk.put(out, value)
        if grads is not None:
            _accumulate_grads(grads, z, h, weight, chunk, work)

    return outputs.mask_(ignored, invalid), grads


def _zero_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    needs: NeededGrads | None,
    compute: torch.dtype,
) -> LinearGrads | None:
    """Zeroed gradients of hidden, weight and bias where ``needs`` asks (``None`` if nowhere):
    hidden's in its dtype, the weight's and the bias's accumulated in ``compute``."""
    want_h, want_w, want_b = needs if needs is not None else NeededGrads(False, False, False)
    want_b = want_b and bias is not None
    if not (want_h or want_w or want_b):
        return None
    vocab, dim = weight.shape
    fp = dict(dtype=compute, device=hidden.device)
    return LinearGrads(
        hidden=torch.zeros_like(hidden) if want_h else None,
        weight=torch.zeros(vocab, dim, **fp) if want_w else None,
        bias=torch.zeros(vocab, **fp) if want_b else None,
    )


def _active_rows(ignored: torch.Tensor) -> torch.Tensor | None:
    """The indices of the rows that are not ignored, or ``None`` for "all of them".

    Ignored tokens never reach a matmul. Finding them costs a host sync, free on the CPU; on
    other devices they are computed and zeroed instead, so the path stays sync-free there.
    """
    if ignored.device.type != "cpu":
        return None
    active = torch.nonzero(~ignored).squeeze(1)
    return None if active.numel() == ignored.numel() else active


class _ChunkRows(NamedTuple):
    """Rows ``start:stop`` of the active rows: of all rows when ``index`` is ``None``, else the
    rows ``index`` names."""

    start: int
    stop: int
    index: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.stop - self.start

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of ``rows`` (a view, or a copy when gathered)."""
        if self.index is None:
            return rows[self.start : self.stop]
        return rows.index_select(0, self.index)

    def put(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` into the chunk's rows of ``rows``."""
        if self.index is None:
            rows[self.start : self.stop] = values
        else:
            rows.index_copy_(0, self.index, values)


@dataclasses.dataclass
class _Workspace:
    """The buffers every chunk reuses.

    ``logits`` holds a chunk's logits in the compute dtype, then their gradient. For inputs in
    another dtype (half precision), ``lowp`` holds them in the input dtype (the matmuls' output
    and input) and ``grad_w_slice`` a slice of the vocabulary's weight gradient; both are
    ``None`` when the inputs are in the compute dtype.
    """

    logits: torch.Tensor  # [rows_per_chunk, V], compute dtype
    lowp: torch.Tensor | None  # [rows_per_chunk, V], the inputs' dtype
    grad_w_slice: torch.Tensor | None  # [slice_rows, D], the inputs' dtype
    rows_per_chunk: int
    rows_per_block: int

    @classmethod
    def allocate(cls, weight: torch.Tensor, n_active: int, compute: torch.dtype) -> _Workspace:
        vocab, dim = weight.shape
        rows_per_chunk = _rows_per_chunk(vocab, n_active, compute.itemsize)
        rows_per_block = _rows_per_block(vocab, rows_per_chunk, compute.itemsize)
        logits = torch.empty(rows_per_chunk, vocab, dtype=compute, device=weight.device)
        lowp = grad_w_slice = None
        if weight.dtype != compute:
            lowp = torch.empty(rows_per_chunk, vocab, dtype=weight.dtype, device=weight.device)
            slice_rows = max(1, min(vocab, SLICE_BYTES // (weight.element_size() * dim)))
            grad_w_slice = torch.empty(slice_rows, dim, dtype=weight.dtype, device=weight.device)
        return cls(logits, lowp, grad_w_slice, rows_per_chunk, rows_per_block)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, work: _Workspace) -> torch.Tensor:
    """The logits ``h @ weight.T`` of a chunk of rows, in the compute dtype, in ``work.logits``."""
    z = work.logits[: h.shape[0]]
    if work.lowp is None:
        torch.mm(h, weight.t(), out=z)
    else:  # the matmul in the input dtype (as the model's own head), scored in float32
        z.copy_(torch.mm(h, weight.t(), out=work.lowp[: h.shape[0]]))
    return z


def _accumulate_grads(
    grads: LinearGrads,
    grad_z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    chunk: _ChunkRows,
    work: _Workspace,
) -> None:
    """Add a chunk's share to the gradients, from the logits' gradient ``grad_z`` (compute
    dtype): the chunk's rows of the hidden gradient, and its sums into the weight's and bias's.

    Half-precision inputs: both gradient matmuls in their dtype (as the model's own head's
    backward), the weight gradient added up in float32 a slice of the vocabulary at a time.
    """
    grad_h, grad_w, grad_b = grads
    z = grad_z
    if work.lowp is not None:
        grad_z = work.lowp[: chunk.count].copy_(z)
    if grad_h is not None:
        chunk.put(grad_h, torch.mm(grad_z, weight))
    if grad_w is not None and work.grad_w_slice is None:
        grad_w.addmm_(grad_z.t(), h)
    elif grad_w is not None:
        vocab, slice_rows = weight.shape[0], work.grad_w_slice.shape[0]
        for v0 in range(0, vocab, slice_rows):
            v1 = min(v0 + slice_rows, vocab)
            part = torch.mm(grad_z[:, v0:v1].t(), h, out=work.grad_w_slice[: v1 - v0])
            grad_w[v0:v1].add_(part)
    if grad_b is not None:
        grad_b.add_(z.sum(dim=0))
