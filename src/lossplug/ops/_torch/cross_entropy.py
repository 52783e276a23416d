"""Chunked PyTorch path of the fused cross-entropy: any device, bounded extra memory.

Rows are processed a chunk at a time through two reusable float32 workspaces, so a bf16/fp16 input
is upcast one chunk at a time (exact, never a full fp32 copy) and the extra memory does not grow
with the number of tokens.
"""

from __future__ import annotations

import torch

from lossplug.ops._spec import LossSpec, RowOutputs

#: Bytes of one float32 workspace; two are used, so the default extra memory is about 64 MiB.
WORKSPACE_BYTES = 32 * 2**20

# exp(-150) is 0 in float32: clamping here changes no sum but keeps 0 * (-inf) out of the
# entropy's dot product when a logit is -inf (masked vocabulary entries).
_EXP_FLOOR = -150.0


def _chunk_rows(vocab: int, n_rows: int) -> int:
    return max(1, min(n_rows, WORKSPACE_BYTES // (4 * vocab)))


def _row_chunks(logits3: torch.Tensor, rows_per_chunk: int):
    """Yield ``(first_row, view)`` with ``view`` a 2-D strided view of consecutive rows."""
    n_outer, n_inner, _ = logits3.shape
    for outer in range(n_outer):
        for start in range(0, n_inner, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_inner)
            yield outer * n_inner + start, logits3[outer, start:stop]


def _softcap_(z: torch.Tensor, cap: float) -> torch.Tensor:
    return z.div_(cap).tanh_().mul_(cap)


def forward(logits3: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> RowOutputs:
    n_outer, n_inner, vocab = logits3.shape
    n_rows = n_outer * n_inner
    device = logits3.device
    f32 = dict(dtype=torch.float32, device=device)
    loss = torch.empty(n_rows, **f32)
    nll = torch.empty(n_rows, **f32)
    lse = torch.empty(n_rows, **f32)
    entropy = torch.empty(n_rows, **f32)
    correct = torch.empty(n_rows, dtype=torch.int32, device=device)
    if n_rows == 0:
        return RowOutputs(loss, nll, lse, entropy, correct)

    rows_per_chunk = _chunk_rows(vocab, n_inner)
    shifted = torch.empty(rows_per_chunk, vocab, **f32)
    probs = torch.empty(rows_per_chunk, vocab, **f32)
    direct = logits3.dtype == torch.float32 and spec.softcap is None
    ignored_all = target == spec.ignore_index
    target_safe = torch.where(ignored_all | (target < 0) | (target >= vocab), 0, target)

    for row0, chunk in _row_chunks(logits3, rows_per_chunk):
        rows = chunk.shape[0]
        sl = slice(row0, row0 + rows)
        work = shifted[:rows]
        if direct:
            z = chunk
        else:
            z = work.copy_(chunk)
            if spec.softcap is not None:
                _softcap_(z, spec.softcap)
        y = target_safe[sl]
        z_true = z.gather(1, y[:, None]).squeeze(1)
        z_max, argmax = z.max(dim=1)
        z_mean = z.mean(dim=1) if spec.label_smoothing > 0 else None
        torch.sub(z, z_max[:, None], out=work).clamp_(min=_EXP_FLOOR)
        p = torch.exp(work, out=probs[:rows])
        sum_exp = p.sum(dim=1)
        # Σ e^(z-m) (z-m) as a batched dot product: no [rows, V] temporary
        weighted = torch.bmm(p[:, None, :], work[:, :, None]).view(rows)
        log_sum = sum_exp.log()
        row_lse = z_max + log_sum
        row_nll = row_lse - z_true
        row_loss = row_nll
        if spec.label_smoothing > 0:
            eps = spec.label_smoothing
            row_loss = (1 - eps) * row_nll + eps * (row_lse - z_mean)
        if spec.z_loss > 0:
            row_loss = row_loss + spec.z_loss * row_lse.square()
        lse[sl] = row_lse
        nll[sl] = row_nll
        loss[sl] = row_loss
        entropy[sl] = log_sum - weighted / sum_exp
        correct[sl] = (argmax == y).to(torch.int32)

    invalid = ~ignored_all & ((target < 0) | (target >= vocab))
    # never a number for a label the caller did not validate (no host sync to raise instead)
    loss.masked_fill_(invalid, float("nan"))
    nll.masked_fill_(invalid, float("nan"))
    for out in (loss, nll, lse, entropy):
        out.masked_fill_(ignored_all, 0.0)
    correct.masked_fill_(ignored_all | invalid, 0)
    return RowOutputs(loss, nll, lse, entropy, correct)


def backward(
    logits3: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    spec: LossSpec,
    grad3: torch.Tensor,
) -> None:
    """Write ``grad_rows * d loss_rows / d logits`` into ``grad3`` (which may be ``logits3``)."""
    n_outer, n_inner, vocab = logits3.shape
    if n_outer * n_inner == 0:
        return
    device = logits3.device
    f32 = dict(dtype=torch.float32, device=device)
    rows_per_chunk = _chunk_rows(vocab, n_inner)
    work_buf = torch.empty(rows_per_chunk, vocab, **f32)
    dtanh_buf = torch.empty(rows_per_chunk, vocab, **f32) if spec.softcap is not None else None

    ignored = target == spec.ignore_index
    g = grad_rows.to(torch.float32).masked_fill(ignored, 0.0)
    eps = spec.label_smoothing
    prob_scale = g * (1.0 + 2.0 * spec.z_loss * lse)
    true_delta = (-(1.0 - eps) * g)[:, None]
    uniform_delta = (g * (eps / vocab))[:, None]
    target_safe = torch.where(ignored | (target < 0) | (target >= vocab), 0, target)[:, None]

    grad_chunks = _row_chunks(grad3, rows_per_chunk)
    for (row0, chunk), (_, out) in zip(
        _row_chunks(logits3, rows_per_chunk), grad_chunks, strict=True
    ):
        rows = chunk.shape[0]
        sl = slice(row0, row0 + rows)
        work = work_buf[:rows]
        if spec.softcap is not None:
            cap = spec.softcap
            t = work.copy_(chunk).div_(cap).tanh_()
            dtanh = torch.mul(t, t, out=dtanh_buf[:rows]).neg_().add_(1.0)
            z = t.mul_(cap)
        else:
            z = chunk
            dtanh = None
        torch.sub(z, lse[sl, None], out=work).exp_()
        work.mul_(prob_scale[sl, None])
        if eps > 0:
            work.sub_(uniform_delta[sl])
        work.scatter_add_(1, target_safe[sl], true_delta[sl])
        if dtanh is not None:
            work.mul_(dtanh)
        work.masked_fill_(ignored[sl, None], 0.0)
        out.copy_(work)
