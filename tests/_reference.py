"""Plain float64 PyTorch references of the fused ops: the ground truth of tests and benchmarks.

One module, imported by both: the tests as ``_reference`` (``pythonpath = ["tests"]`` in
pyproject.toml), the benchmarks by putting this folder on ``sys.path`` (they run as scripts with
``benchmarks/`` on it already). It lives with the tests because the tests are its first users and
the benchmarks only borrow it: a copy under ``benchmarks/`` re-exported here would put two
modules named ``_reference`` on the path.

* :func:`reference_cross_entropy` and :func:`reference_linear_cross_entropy`: every option, the
  loss differentiable (autograd gives the float64 gradients), the logits materialised whole;
* :func:`reference_cross_entropy_rows` and :func:`reference_linear_cross_entropy_rows`: plain
  cross-entropy (mean over the scored rows) a block of rows at a time, for inputs whose float64
  logits would not fit, with the gradients written out (no autograd graph);
* :func:`reference_values`: the logged values (cross-entropy, perplexity, token accuracy,
  entropy and the token count) over several batches, from their float64 sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
MiB = 2**20


def reference_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    all_ignored: str = "zero",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (differentiable with respect to ``logits``) and the stats, all in float64."""
    x = logits.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    t = target
    if shift:
        x, t = x[..., :-1, :], t[..., 1:]
    vocab = x.shape[-1]
    rows_x = x.reshape(-1, vocab)
    rows_t = t.reshape(-1)
    valid = rows_t != ignore_index
    safe_t = torch.where(valid, rows_t, 0)
    log_p = torch.log_softmax(rows_x, dim=-1)
    lse = torch.logsumexp(rows_x, dim=-1)
    nll = -log_p.gather(1, safe_t[:, None])[:, 0]
    smooth = -log_p.mean(dim=-1)
    per_row = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse.square()
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    tokens = valid.sum()
    if reduction == "none":
        loss = per_row.reshape(t.shape)
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        denominator = tokens.clamp(min=1) if all_ignored == "zero" else tokens
        loss = per_row.sum() / denominator
    p = log_p.exp()
    row_entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
    stats = {
        "nll_sum": nll.detach()[valid].sum(),
        "tokens": tokens,
        "correct": ((rows_x.argmax(dim=-1) == rows_t) & valid).sum(),
        "entropy_sum": row_entropy.detach()[valid].sum(),
        "lse_sq_sum": lse.detach()[valid].square().sum(),
    }
    return loss, stats


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The linear head's loss and stats: float64 logits ``F.linear(hidden, weight, bias)``
    materialised whole, then :func:`reference_cross_entropy` with the same ``options``.

    Pass float64 leaves that require grad to get float64 gradients for each of them (``double()``
    is then the identity, so autograd reaches the leaves).
    """
    bias64 = None if bias is None else bias.double()
    logits = F.linear(hidden.double(), weight.double(), bias64)
    return reference_cross_entropy(logits, target, **options)


def reference_values(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], **options: Any
) -> dict[str, float]:
    """The logged values over ``(logits, target)`` batches, token-weighted over all of them.

    Sums the float64 statistics of :func:`reference_cross_entropy` (with ``options``) over the
    batches, then applies each value's formula to the sums: ``cross_entropy`` (Σ nll / tokens),
    ``perplexity`` (its ``exp``), ``token_accuracy``, ``entropy``, and ``tokens``.
    """
    sums = {"nll_sum": 0.0, "tokens": 0, "correct": 0, "entropy_sum": 0.0}
    for logits, target in batches:
        _, stats = reference_cross_entropy(logits, target, **options)
        for key in sums:
            sums[key] += stats[key].item()
    n = sums["tokens"]
    return {
        "cross_entropy": sums["nll_sum"] / n,
        "perplexity": math.exp(sums["nll_sum"] / n),
        "token_accuracy": sums["correct"] / n,
        "entropy": sums["entropy_sum"] / n,
        "tokens": n,
    }


# ----------------------------------------------------------------------------------------------
# bounded-memory forms for the benchmarks: a block of rows at a time, gradients of the mean loss


def reference_cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    grad: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE,
    block_bytes: int = 16 * MiB,
    stats: bool = True,
    grad_rtol: float | None = None,
    grad_atol: float = 0.0,
) -> dict[str, float]:
    """Float64 loss and statistics of the rows of ``logits [..., V]`` against ``target [...]``,
    and how far ``grad`` is from the gradient of the mean loss, a block of rows at a time.

    Computed from the very values given (bf16 logits are compared with their own rounded
    values); no float64 copy of more than ``block_bytes`` exists at once. Returns ``loss`` (mean
    over the scored rows), ``nll_sum`` and ``tokens``; with ``stats`` also ``entropy_sum``,
    ``lse_sq_sum`` and ``correct`` (``torch.argmax`` takes the first maximum, the tie rule of
    ``TokenStats.correct``). With ``grad``: ``grad_max_abs_err`` (``max |grad - g_ref|``) and
    ``grad_max_ref`` (``max |g_ref|``), and with ``grad_rtol`` also ``grad_excess``, the largest
    ratio of ``|grad - g_ref|`` to the elementwise bound ``grad_rtol |g_ref| + grad_atol / n``
    (``n`` the scored rows: the largest ``|g_ref|`` is at most ``1 / n``).
    """
    vocab = logits.shape[-1]
    flat, y_all = logits.reshape(-1, vocab), target.reshape(-1)
    n_rows = flat.shape[0]
    valid_all = y_all != ignore_index
    count = int(valid_all.sum())
    scale = 1.0 / max(count, 1)
    g_flat = None if grad is None else grad.reshape(-1, vocab)
    rows = max(1, block_bytes // (8 * vocab))
    acc = {"nll_sum": 0.0}
    if stats:
        acc.update(entropy_sum=0.0, lse_sq_sum=0.0, correct=0.0)
    err_max, ref_max, worst_ratio = 0.0, 0.0, 0.0
    for start in range(0, n_rows, rows):
        sl = slice(start, min(start + rows, n_rows))
        z = flat[sl].double()
        y, ok = y_all[sl], valid_all[sl]
        y_safe = y.clamp(min=0)
        lse = torch.logsumexp(z, dim=1)
        p = torch.exp(z - lse[:, None])
        nll = lse - z.gather(1, y_safe[:, None]).squeeze(1)
        acc["nll_sum"] += float(nll[ok].sum())
        if stats:
            entropy = lse - (p * z).sum(dim=1)
            acc["entropy_sum"] += float(entropy[ok].sum())
            acc["lse_sq_sum"] += float(lse[ok].square().sum())
            acc["correct"] += float(((z.argmax(dim=1) == y) & ok).sum())
        del z
        if g_flat is not None:
            g_ref = p  # d(mean loss)/d(logits), in place: softmax - one-hot, over the scored rows
            g_ref[torch.arange(g_ref.shape[0], device=g_ref.device), y_safe] -= 1.0
            g_ref.mul_(ok[:, None].double() * scale)
            diff = (g_flat[sl].double() - g_ref).abs_()
            err_max = max(err_max, float(diff.max()))
            ref_max = max(ref_max, float(g_ref.abs().max()))
            if grad_rtol is not None:
                bound = g_ref.abs_().mul_(grad_rtol).add_(grad_atol * scale)
                worst_ratio = max(worst_ratio, float((diff / bound).max()))
                del bound
            del g_ref, diff
        del p
    out = {**acc, "tokens": float(count), "loss": acc["nll_sum"] / max(count, 1)}
    if g_flat is not None:
        out.update(grad_max_abs_err=err_max, grad_max_ref=ref_max)
        if grad_rtol is not None:
            out["grad_excess"] = worst_ratio
    return out


def reference_linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = IGNORE,
    block_bytes: int = 256 * MiB,
    stats: bool = True,
) -> dict[str, Any]:
    """Float64 loss, statistics and gradients of the linear head's mean loss, the float64
    logits ``hidden @ weight.T`` materialised a block of rows at a time.

    ``hidden [N, D]``, ``weight [V, D]``, ``target [N]``, used at the very values given (bf16
    inputs at their own rounded values). Only scored rows are computed (an ignored row's
    gradient is 0); a block holds at most ``block_bytes`` of float64 logits (twice that with
    ``stats``, which keeps the logits beside the probabilities). Returns ``loss``, ``nll_sum``
    and ``tokens`` (floats); with ``stats`` also ``entropy_sum``, ``lse_sq_sum`` and
    ``correct``; and the float64 gradients ``grad_hidden [N, D]`` and ``grad_weight [V, D]``.
    """
    h64, w64 = hidden.double(), weight.double()
    vocab = weight.shape[0]
    active = torch.nonzero(target != ignore_index).squeeze(1)
    count = active.numel()
    grad_h = torch.zeros_like(h64)
    grad_w = torch.zeros_like(w64)
    nll_sum = torch.zeros((), dtype=torch.float64, device=h64.device)
    acc = {"entropy_sum": 0.0, "lse_sq_sum": 0.0, "correct": 0.0} if stats else {}
    rows = max(1, block_bytes // (8 * vocab))
    for start in range(0, count, rows):
        index = active[start : start + rows]
        h_rows, y = h64.index_select(0, index), target.index_select(0, index)
        z = h_rows @ w64.t()
        lse = torch.logsumexp(z, dim=1)
        nll_sum += (lse - z.gather(1, y[:, None])[:, 0]).sum()
        if stats:
            acc["correct"] += float((z.argmax(dim=1) == y).sum())
            acc["lse_sq_sum"] += float(lse.square().sum())
            p = torch.exp(z - lse[:, None])
            acc["entropy_sum"] += float((lse - z.mul_(p).sum(dim=1)).sum())
        else:
            p = z.sub_(lse[:, None]).exp_()  # no second block: the logits are not needed again
        del z
        p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
        p.div_(count)
        grad_h.index_copy_(0, index, p @ w64)
        grad_w.addmm_(p.t(), h_rows)
        del p
    nll = float(nll_sum)
    return {
        "loss": float(nll_sum / max(count, 1)),
        "nll_sum": nll,
        "tokens": float(count),
        **acc,
        "grad_hidden": grad_h,
        "grad_weight": grad_w,
    }


def max_abs_errors(
    grad: torch.Tensor, ref: torch.Tensor, block_bytes: int = 64 * MiB
) -> tuple[float, float]:
    """``(max |grad - ref|, max |ref|)``, a block of rows at a time (no whole float64 copy)."""
    err, top = 0.0, 0.0
    rows = max(1, block_bytes // (8 * max(1, ref.shape[-1])))
    for start in range(0, ref.shape[0], rows):
        r = ref[start : start + rows]
        err = max(err, float((grad[start : start + rows].double() - r).abs_().max()))
        top = max(top, float(r.abs().max()))
    return err, top


def max_rel_err(grad: torch.Tensor | None, ref: torch.Tensor) -> float | None:
    """``max |grad - ref| / max |ref|`` (``None`` without ``grad`` or when ``ref`` is 0)."""
    if grad is None:
        return None
    err, top = max_abs_errors(grad, ref)
    return err / top if top > 0 else None
