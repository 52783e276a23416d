"""The loss a step trained on, compared with the monitor's own cross-entropy of the same logits."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lossplug.ops.stats import TokenStats


class LossComparison(NamedTuple):
    """How the loss a step returned compares with the monitor's own cross-entropy.

    Attributes:
        batches: micro-batches compared.
        loss: mean over them of the loss the step returned (per micro-batch, as trained).
        cross_entropy: mean over them of the monitor's mean NLL per scored token.
        agrees: the two agree within the tolerance, or the loss is the summed NLL (a
            ``reduction="sum"`` loss: the same numbers, reduced differently).
        other_shift: what the other ``shift`` convention would give on the same logits (estimated
            on the tokens scored both ways), or ``None`` when it could not be computed.
        other_shift_agrees: ``other_shift`` explains the loss far better than the current one.
    """

    batches: int
    loss: float
    cross_entropy: float
    agrees: bool
    other_shift: float | None
    other_shift_agrees: bool


class LossCheck:
    """Sums, on the device, of the loss each micro-batch trained on and of the monitor's numbers.

    Adding never synchronises with the host: each micro-batch adds one small stacked tensor.
    :meth:`compare` reads the sums (one copy of seven numbers), so it belongs where the monitor
    synchronises anyway, at a logging step. Micro-batches with no scored token or a non-finite
    loss are left out: they have no mean to compare.

    Means per micro-batch are compared, not token-weighted means, because that is what a
    ``"mean"`` loss is: an exact match then holds under gradient accumulation and whatever the
    share of ignored tokens in each micro-batch.

    Example:
        >>> import torch, lossplug
        >>> check = LossCheck()
        >>> logits, target = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
        >>> loss, stats = lossplug.cross_entropy(logits, target, return_stats=True)
        >>> check.add(loss, stats)
        >>> check.compare(rtol=0.02, atol=1e-3).agrees
        True
    """

    def __init__(self) -> None:
        # float64 [batches, Σ loss, Σ mean nll, Σ nll sum, batches with other, Σ loss, Σ other]
        self.sums: torch.Tensor | None = None

    def add(
        self,
        loss: torch.Tensor,
        stats: TokenStats,
        other_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add one micro-batch: its trained ``loss`` (a scalar tensor), the monitor's ``stats``
        of it and, optionally, ``(Σ nll, tokens)`` under the other ``shift`` convention."""
        f64 = torch.float64
        tokens = stats.tokens.to(f64)
        loss = loss.detach().to(device=tokens.device, dtype=f64).reshape(())
        ok = (tokens > 0) & torch.isfinite(loss)
        zero = torch.zeros((), dtype=f64, device=tokens.device)
        nll_sum = stats.nll_sum.to(f64)
        row = [
            ok.to(f64),
            torch.where(ok, loss, zero),
            torch.where(ok, nll_sum / tokens.clamp(min=1), zero),
            torch.where(ok, nll_sum, zero),
        ]
        if other_shift is None:
            row += [zero, zero, zero]
        else:
            other_sum, other_tokens = (t.to(device=tokens.device, dtype=f64) for t in other_shift)
            other_ok = ok & (other_tokens > 0)
            row += [
                other_ok.to(f64),
                torch.where(other_ok, loss, zero),
                torch.where(other_ok, other_sum / other_tokens.clamp(min=1), zero),
            ]
        packed = torch.stack(row)
        self.sums = packed if self.sums is None else self.sums.to(packed.device) + packed

    def reset(self) -> None:
        self.sums = None

    def compare(self, rtol: float, atol: float) -> LossComparison | None:
        """The comparison since the last call (``None`` if no micro-batch could be compared);
        then starts again. Synchronises with the host."""
        sums, self.sums = self.sums, None
        if sums is None:
            return None
        batches, loss, mean_nll, nll_sum, other_batches, other_loss, other = sums.tolist()
        if batches == 0:
            return None
        loss, mean_nll, nll_sum = loss / batches, mean_nll / batches, nll_sum / batches
        agrees = _close(loss, mean_nll, rtol, atol) or _close(loss, nll_sum, rtol, atol)
        other_mean, other_agrees = None, False
        if other_batches > 0:
            other_mean, other_loss = other / other_batches, other_loss / other_batches
            # an estimate on a subset of the tokens: it need not match to rounding, only explain
            # the loss far better than the current convention does
            gap = abs(mean_nll - loss) / max(abs(loss), atol)
            other_gap = abs(other_mean - other_loss) / max(abs(other_loss), atol)
            other_agrees = other_gap <= max(2 * rtol, gap / 4)
        return LossComparison(int(batches), loss, mean_nll, agrees, other_mean, other_agrees)


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def other_shift_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    nll: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Σ nll, tokens)`` under the other ``shift`` convention, from this one's per-token NLL.

    A row's log-sum-exp does not depend on its label, so ``lse = nll + x[label]`` and the NLL of
    any other label is ``lse - x[other]``: two gathers of one logit per row, no pass over the
    vocabulary. Only positions ``t < T - 1`` whose labels ``t`` and ``t + 1`` are both scored
    count, so this is an estimate on most, not all, of the tokens.

    Args:
        logits: ``[..., T, V]`` as given to the op.
        labels: ``[..., T]`` as given to the op.
        nll: the op's ``reduction="none"`` output for them (``[..., T - 1]`` when ``shift``).
        shift: the convention ``nll`` was computed with.
        ignore_index: as given to the op.
        softcap: as given to the op.

    Returns:
        Device tensors (no host synchronisation), or ``None`` when the shapes have no sequence
        axis of two positions or more.
    """
    if labels.dim() < 1 or labels.shape[-1] < 2 or logits.dim() != labels.dim() + 1:
        return None
    f64, vocab = torch.float64, logits.shape[-1]
    rows = logits.detach()[..., :-1, :]  # a view: positions 0 … T - 2
    labels = labels.to(torch.int64)
    early, late = labels[..., :-1], labels[..., 1:]
    both = (early != ignore_index) & (late != ignore_index)
    both &= (early >= 0) & (early < vocab) & (late >= 0) & (late < vocab)  # safe to gather
    now, other = (late, early) if shift else (early, late)

    def logit(index: torch.Tensor) -> torch.Tensor:
        x = rows.gather(-1, torch.where(both, index, 0).unsqueeze(-1)).squeeze(-1).to(f64)
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    nll_rows = (nll if shift else nll[..., :-1]).to(f64)
    other_nll = torch.where(both, nll_rows + logit(now) - logit(other), 0.0)
    return other_nll.sum(), both.sum()
