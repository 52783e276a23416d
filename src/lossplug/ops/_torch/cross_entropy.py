"""Chunked PyTorch path of the fused cross-entropy: any device, bounded extra memory.

Rows are processed a chunk at a time through reusable float32 workspaces, a few per thread, so a
bf16/fp16 input is upcast one chunk at a time (exact, never a full fp32 copy) and the extra memory
does not grow with the number of tokens. float64 logits are computed in float64 throughout
(workspaces and row outputs included): whoever passes float64 asks for its precision.

On a CPU with several torch threads the chunks are shared out among that many worker threads,
each running torch single-threaded with workspaces of its own. Each chunk costs a dozen small ops;
run with intra-op parallelism, every one of them would end at a barrier that waits for the slowest
thread, and when other processes load the cores a descheduled thread stalls them all. Workers
that take the next chunk when they are done only ever wait once, at the end. Each row is computed
by one thread either way, so the results do not depend on the number of threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from lossplug.ops._spec import LossSpec, RowOutputs

#: ``forward_with_grad`` exists: a scalar loss gets its gradient in the forward sweep.
PRECOMPUTES_GRAD = True

#: Bytes of one workspace (a thread uses at most two; three when the forward also writes the
#: gradient of soft-capped half-precision logits with statistics). Chunks of this size stay in
#: the last-level cache of a typical CPU; smaller ones pay in per-op overhead.
WORKSPACE_BYTES = 8 * 2**20

# exp(-150) is 0 in float32 and exp(-800) in float64: clamping the log-probabilities there changes
# no probability but keeps 0 * (-inf) out of the entropy when a logit is -inf (masked vocabulary
# entries).
_LOG_FLOOR = {torch.float32: -150.0, torch.float64: -800.0}
# width of the blocks of the two-level argmax (torch's CPU argmax is several times slower than amax)
_ARGMAX_BLOCK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype this path computes in for ``dtype`` inputs: float64 stays, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int, n_rows: int, itemsize: int = 4) -> int:
    return max(1, min(n_rows, WORKSPACE_BYTES // (itemsize * vocab)))


def _row_chunks(logits: torch.Tensor, rows_per_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, view)`` of ``logits`` ``[outer, inner, V]``, ``view`` a 2-D strided
    view of consecutive rows."""
    n_outer, n_inner, _ = logits.shape
    for outer in range(n_outer):
        for start in range(0, n_inner, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_inner)
            yield outer * n_inner + start, logits[outer, start:stop]


_Item = TypeVar("_Item")

#: Fewest logits for which the chunks are shared out among threads (4 MiB of float32).
_MIN_PARALLEL_ELEMENTS = 2**20

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the pools' threads did not come along (a pool would wait for them
    forever), and the lock may have been held by a thread that no longer exists."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads that each run torch single-threaded."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            # torch's thread count is per thread: the caller's stays as it is
            pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix="lossplug-ce",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
            _POOLS[workers] = pool
        return pool


def run_chunks(
    work: Callable[[Iterable[_Item]], None],
    chunks: list[_Item],
    device: torch.device,
    n_elements: int,
) -> None:
    """``work(chunks)`` here, or on a CPU shared out among ``torch.get_num_threads()`` threads.

    ``work`` allocates its own workspaces and writes only the rows of the chunks it is given, so
    threads never touch the same memory. Each thread takes the next chunk when it is done with
    one, and the calling thread is one of them: a descheduled thread holds up at most the chunk
    it has taken. Autograd and inference mode are thread-local: the pool's threads run under the
    caller's inference mode, without autograd (every op here is in place or into workspaces,
    none is differentiated). Inputs of under ``_MIN_PARALLEL_ELEMENTS`` logits stay in the
    calling thread, where starting the others would cost more than it saves.
    """
    workers = min(torch.get_num_threads(), len(chunks))
    if device.type != "cpu" or workers <= 1 or n_elements < _MIN_PARALLEL_ELEMENTS:
        work(chunks)
        return
    inference = torch.is_inference_mode_enabled()
    lock = threading.Lock()
    shared = iter(chunks)

    def next_chunks() -> Iterator[_Item]:
        while True:
            with lock:
                item = next(shared, None)
            if item is None:
                return
            yield item

    def helper() -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(next_chunks())

    pool = _worker_pool(workers - 1)
    futures = [pool.submit(helper) for _ in range(workers - 1)]
    # the caller works single-threaded too, so that no two thread teams share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work(next_chunks())
    finally:
        torch.set_num_threads(threads)
        for future in futures:
            future.result()  # waits for every helper; re-raises a helper's exception here


def softcap_(
    z: torch.Tensor, cap: float, dtanh_out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``z = cap * tanh(z / cap)`` in place; with ``dtanh_out`` also writes the derivative
    ``1 - tanh²`` there and returns it (``None`` otherwise)."""
    t = z.div_(cap).tanh_()
    dtanh = None if dtanh_out is None else torch.mul(t, t, out=dtanh_out).neg_().add_(1.0)
    t.mul_(cap)
    return dtanh


def _first_argmax(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(dim=1)`` (index of the first maximum) from block maxima: one fast pass."""
    vocab = z.shape[1]
    main = (vocab // _ARGMAX_BLOCK) * _ARGMAX_BLOCK
    if main == 0:
        return z.argmax(dim=1)
    block_max = z[:, :main].unflatten(1, (-1, _ARGMAX_BLOCK)).amax(dim=2)
    block = block_max.argmax(dim=1)
    cols = block[:, None] * _ARGMAX_BLOCK + torch.arange(_ARGMAX_BLOCK, device=z.device)
    index = block * _ARGMAX_BLOCK + z.gather(1, cols).argmax(dim=1)
    if main == vocab:
        return index
    tail_max, tail_index = z[:, main:].max(dim=1)
    main_max = block_max.gather(1, block[:, None])[:, 0]
    # strictly greater: on a tie the earlier (main) index is the first maximum
    return torch.where(tail_max > main_max, tail_index + main, index)


def score_chunk(
    z: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec,
    log_probs_buf: torch.Tensor,
    probs_buf: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Per-row ``(loss, nll, lse, entropy, correct)`` of the (soft-capped) logits ``z``.

    ``z`` is float32, or float64 for float64 inputs; the results have its dtype. ``target`` must
    be a valid class for every row (callers mask ignored rows afterwards). ``log_probs_buf`` and
    ``probs_buf`` are ``z``-shaped workspaces of ``z``'s dtype; ``probs_buf`` may be
    ``z`` itself (it holds the softmax on return when ``spec.full_stats``). The pass without a
    gradient; :func:`score_chunk_with_grad` is the one with.
    """
    y = target[:, None]
    z_mean = z.mean(dim=1) if spec.label_smoothing > 0 else None
    if spec.full_stats:
        argmax = _first_argmax(z)
        z_max = z.gather(1, argmax[:, None])[:, 0]
    else:
        z_max = z.amax(dim=1)
    log_p = torch.ops.aten._log_softmax.out(z, 1, False, out=log_probs_buf)
    row_nll = log_p.gather(1, y)[:, 0].neg_()
    # the log-probability of the largest logit is -log Σ e^(z - max): exact, never -inf
    row_lse = z_max - (
        log_p.gather(1, argmax[:, None])[:, 0] if spec.full_stats else log_p.amax(dim=1)
    )
    if spec.full_stats:
        log_p.clamp_(min=_LOG_FLOOR[z.dtype])
        p = torch.exp(log_p, out=probs_buf)  # z is not needed any more
        row_entropy = log_p.mul_(p).sum(dim=1).neg_()
        row_correct = argmax == y[:, 0]
    else:
        row_entropy = torch.zeros_like(row_nll)
        row_correct = torch.zeros_like(row_nll, dtype=torch.bool)
    row_loss = spec.training_loss(row_nll, row_lse, z_mean)
    return row_loss, row_nll, row_lse, row_entropy, row_correct


class _ForwardPass:
    """The row outputs of a forward pass over ``logits`` ``[outer, inner, V]``, filled a chunk of
    rows at a time, and what every chunk needs: the compute dtype, the chunk size, the targets."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> None:
        n_outer, n_inner, self.vocab = logits.shape
        self.n_rows = n_outer * n_inner
        self.compute = compute_dtype(logits.dtype)
        self.fp = dict(dtype=self.compute, device=logits.device)
        # uninitialised: every row is written by its chunk
        self.outputs = RowOutputs(
            *(torch.empty(self.n_rows, **self.fp) for _ in range(4)),
            correct=torch.empty(self.n_rows, dtype=torch.int32, device=logits.device),
        )
        self.rows_per_chunk = _chunk_rows(self.vocab, n_inner, self.compute.itemsize)
        self.ignored, self.invalid, self.target_safe = spec.target_masks(target, self.vocab)

    def workspace(self) -> torch.Tensor:
        """A chunk-sized workspace of the compute dtype."""
        return torch.empty(self.rows_per_chunk, self.vocab, **self.fp)

    def store(self, row0: int, values: tuple[torch.Tensor, ...]) -> None:
        """Write a chunk's row outputs, from row ``row0`` on."""
        for out, value in zip(self.outputs.tensors(), values, strict=True):
            out[row0 : row0 + value.shape[0]] = value

    def result(self) -> RowOutputs:
        return self.outputs.mask_(self.ignored, self.invalid)


def _chunk_pairs(
    logits: torch.Tensor, grad_logits: torch.Tensor, rows_per_chunk: int
) -> list[tuple[tuple[int, torch.Tensor], torch.Tensor]]:
    """Each ``(first_row, chunk)`` of the logits with the chunk of ``grad_logits`` for its rows."""
    pairs = zip(
        _row_chunks(logits, rows_per_chunk), _row_chunks(grad_logits, rows_per_chunk), strict=True
    )
    return [(chunk, out) for chunk, (_, out) in pairs]


def forward(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> RowOutputs:
    """The per-row outputs of ``logits`` ``[outer, inner, V]`` against ``target`` ``[N]``."""
    rows = _ForwardPass(logits, target, spec)
    if rows.n_rows == 0:
        return rows.outputs
    direct = logits.dtype == rows.compute and spec.softcap is None

    def work(chunks: Iterable[tuple[int, torch.Tensor]]) -> None:
        log_probs_buf, probs_buf = rows.workspace(), rows.workspace()
        for row0, chunk in chunks:
            n = chunk.shape[0]
            if direct:
                z = chunk
            else:  # upcast (and soft-cap) one chunk at a time, never the whole tensor
                z = probs_buf[:n].copy_(chunk)
                if spec.softcap is not None:
                    softcap_(z, spec.softcap)
            target_safe = rows.target_safe[row0 : row0 + n]
            rows.store(row0, score_chunk(z, target_safe, spec, log_probs_buf[:n], probs_buf[:n]))

    run_chunks(work, list(_row_chunks(logits, rows.rows_per_chunk)), logits.device, logits.numel())
    return rows.result()


def score_chunk_with_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    spec: LossSpec,
    shifted_out: torch.Tensor,
    grad_out: torch.Tensor,
    dtanh: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """:func:`score_chunk` and the gradient of ``Σ weight * loss_row`` in the same sweep.

    One exponential per logit serves the log-sum-exp, the entropy and the gradient. Without
    statistics, torch's softmax kernel makes the sweep: max, exponentials, sum and scaling in one
    call, with its faster vectorised exponential (a third quicker than separate ops); ``Σe`` comes
    back as ``1 / p`` at the largest logit, whose ``e`` is ``exp(0) = 1``, so ``lse = max - log
    p_max``, as in :func:`score_chunk`. With statistics, ``d = z - max`` and ``e = exp(d)`` give
    ``lse = max + log Σe``, the softmax ``e / Σe`` and the entropy ``log Σe - Σ e·d / Σe``, a sum
    of two non-negative terms (``d <= 0``), so it loses nothing to cancellation however peaked
    the distribution; ``d`` is written to ``shifted_out``, which may be ``z`` itself (a
    workspace). ``grad_out`` (``z``'s dtype, possibly ``z`` itself when no statistics are wanted)
    receives the gradient; ``weight`` is ``[n]`` (0 at rows that are not scored) and ``dtanh``
    the softcap's derivative.
    """
    y = target[:, None]
    z_mean = z.mean(dim=1) if spec.label_smoothing > 0 else None
    row_nll = z.gather(1, y)[:, 0].neg_()  # -z_y here, lse - z_y below
    if spec.full_stats:
        argmax = _first_argmax(z)
        z_max = z.gather(1, argmax[:, None])[:, 0]
        d = torch.sub(z, z_max[:, None], out=shifted_out)  # z is not needed any more
        d.clamp_(min=_LOG_FLOOR[z.dtype])  # e = 0 either way; keeps 0 * (-inf) out of Σ e·d
        p = torch.exp(d, out=grad_out)
        sum_e = p.sum(dim=1)
        log_sum_e = sum_e.log()
        row_lse = z_max + log_sum_e
        e_dot_d = d.mul_(p).sum(dim=1)  # d is not needed any more
        row_entropy = log_sum_e - e_dot_d / sum_e
        row_correct = argmax == target
    else:
        z_max = z.amax(dim=1)
        p = torch.softmax(z, 1, out=grad_out)  # z is not needed any more
        row_lse = z_max - p.amax(dim=1).log_()
        row_entropy = torch.zeros_like(row_nll)
        row_correct = torch.zeros_like(target, dtype=torch.bool)
        sum_e = None  # p is normalised already
    row_nll.add_(row_lse)
    row_loss = spec.training_loss(row_nll, row_lse, z_mean)
    prob_scale, true_delta, uniform_delta = grad_coefficients(weight, row_lse, spec, z.shape[1])
    if sum_e is not None:
        prob_scale = prob_scale / sum_e[:, None]
    probs_to_grad_(p, y, prob_scale, true_delta, uniform_delta, dtanh)
    return row_loss, row_nll, row_lse, row_entropy, row_correct


def forward_with_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    spec: LossSpec,
    weight: torch.Tensor,
    grad_logits: torch.Tensor,
) -> RowOutputs:
    """:func:`forward`, and the gradient of ``weight * Σ loss_row`` written into ``grad_logits``.

    For a loss reduced to a scalar (``"mean"``: ``weight = 1 / tokens``; ``"sum"``: 1) the gradient
    each row gets is known before ``backward()``: computing it while the chunk is in the cache
    saves the second sweep over the logits and its exponentials. ``backward()`` then only scales
    it when the incoming gradient is not 1. ``grad_logits`` has the logits' shape and dtype and
    must not be ``logits``.
    """
    rows = _ForwardPass(logits, target, spec)
    if rows.n_rows == 0:
        return rows.outputs
    row_weight = weight.to(rows.compute).expand(rows.n_rows).masked_fill(rows.ignored, 0.0)
    softcap = spec.softcap
    # the gradient is computed where it is stored when it has the compute dtype
    grad_via_workspace = grad_logits.dtype != rows.compute
    upcast = logits.dtype != rows.compute or softcap is not None

    full = spec.full_stats
    # workspaces only where a value must outlive the next one: an upcast chunk is shifted and
    # exponentiated in place, and without statistics d is not needed after e (written over it)
    need_shifted = full and not upcast
    need_grad_buf = grad_via_workspace and full

    def work(chunk_pairs: Iterable[tuple[tuple[int, torch.Tensor], torch.Tensor]]) -> None:
        def workspace(needed: bool) -> torch.Tensor | None:
            return rows.workspace() if needed else None

        shifted_buf, z_buf = workspace(need_shifted), workspace(upcast)
        grad_buf, dtanh_buf = workspace(need_grad_buf), workspace(softcap is not None)
        for (row0, chunk), out in chunk_pairs:
            n = chunk.shape[0]
            sl = slice(row0, row0 + n)
            dtanh = None
            if upcast:  # upcast (and soft-cap) one chunk at a time, never the whole tensor
                z = z_buf[:n].copy_(chunk)
                if softcap is not None:
                    dtanh = softcap_(z, softcap, dtanh_buf[:n])
            else:
                z = chunk
            dest = (grad_buf[:n] if full else z) if grad_via_workspace else out
            shifted = z if upcast else (shifted_buf[:n] if full else dest)
            values = score_chunk_with_grad(
                z, rows.target_safe[sl], row_weight[sl], spec, shifted, dest, dtanh
            )
            rows.store(row0, values)
            if grad_via_workspace:
                out.copy_(dest)

    chunks = _chunk_pairs(logits, grad_logits, rows.rows_per_chunk)
    run_chunks(work, chunks, logits.device, logits.numel())
    return rows.result()


def grad_coefficients(
    g: torch.Tensor, lse: torch.Tensor, spec: LossSpec, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``[N, 1]`` factors turning row softmaxes into ``g * d loss_row / d logits``.

    The gradient of a row is ``softmax * prob_scale + true_delta at the target -
    uniform_delta`` (``uniform_delta`` is ``None`` without label smoothing), times the softcap's
    derivative.
    """
    eps = spec.label_smoothing
    prob_scale = (g * (1.0 + 2.0 * spec.z_loss * lse))[:, None]
    true_delta = (-(1.0 - eps) * g)[:, None]
    uniform_delta = (g * (eps / vocab))[:, None] if eps > 0 else None
    return prob_scale, true_delta, uniform_delta


def probs_to_grad_(
    probs: torch.Tensor,
    target: torch.Tensor,
    prob_scale: torch.Tensor,
    true_delta: torch.Tensor,
    uniform_delta: torch.Tensor | None,
    dtanh: torch.Tensor | None,
) -> torch.Tensor:
    """Turn the softmax ``probs`` ``[n, V]`` (float32 or float64) into the logits' gradient, in
    place.

    ``target`` is ``[n, 1]`` (valid classes), the factors come from :func:`grad_coefficients`
    and ``dtanh`` is the softcap's derivative (``None`` without a softcap).
    """
    probs.mul_(prob_scale)
    if uniform_delta is not None:
        probs.sub_(uniform_delta)
    probs.scatter_add_(1, target, true_delta)
    if dtanh is not None:
        probs.mul_(dtanh)
    return probs


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    grad_logits: torch.Tensor,
) -> None:
    """Write ``grad_rows * d loss_rows / d logits`` into ``grad_logits`` (which may be
    ``logits``)."""
    n_outer, n_inner, vocab = logits.shape
    if n_outer * n_inner == 0:
        return
    compute = compute_dtype(logits.dtype)
    fp = dict(dtype=compute, device=logits.device)
    rows_per_chunk = _chunk_rows(vocab, n_inner, compute.itemsize)
    softcap = spec.softcap
    # a gradient in the compute dtype is computed where it is stored; otherwise via a workspace
    grad_via_workspace = grad_logits.dtype != compute

    ignored, _, target_safe = spec.target_masks(target, vocab)
    g = grad_rows.to(compute).masked_fill(ignored, 0.0)
    # ignored rows have g = 0, so all three coefficients are 0 there: exact zeros, no extra pass
    prob_scale, true_delta, uniform_delta = grad_coefficients(g, lse, spec, vocab)
    target_safe = target_safe[:, None]

    def work(chunk_pairs: Iterable[tuple[tuple[int, torch.Tensor], torch.Tensor]]) -> None:
        work_buf = (
            torch.empty(rows_per_chunk, vocab, **fp) if grad_via_workspace or softcap else None
        )
        dtanh_buf = torch.empty(rows_per_chunk, vocab, **fp) if softcap is not None else None
        for (row0, chunk), out in chunk_pairs:
            n = chunk.shape[0]
            sl = slice(row0, row0 + n)
            dest = work_buf[:n] if grad_via_workspace else out
            dtanh = None
            if softcap is not None:
                z = work_buf[:n].copy_(chunk)
                dtanh = softcap_(z, softcap, dtanh_buf[:n])
            elif grad_via_workspace:  # upcast into the workspace
                z = dest.copy_(chunk)
            else:
                z = chunk
            # The softmax again, not e^(z - lse): lse is rounded to float32 at the logits'
            # magnitude (an ulp of 7.6e-6 at 77), which e^(z - lse) - 1 at a confident target
            # turns into that much absolute error; the kernel's own max and sum do not.
            probs = torch.softmax(z, 1, out=dest)
            probs_to_grad_(
                probs,
                target_safe[sl],
                prob_scale[sl],
                true_delta[sl],
                None if uniform_delta is None else uniform_delta[sl],
                dtanh,
            )
            if grad_via_workspace:
                out.copy_(dest)

    chunks = _chunk_pairs(logits, grad_logits, rows_per_chunk)
    run_chunks(work, chunks, logits.device, logits.numel())
