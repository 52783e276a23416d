"""A plain float64 PyTorch reference for the fused ops: the ground truth the tests compare with."""

from __future__ import annotations

import torch


def reference_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
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
