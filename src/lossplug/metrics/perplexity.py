"""Perplexity, ``exp(Σ nll / Σ tokens)``: functional form and Metric."""

from __future__ import annotations

import torch

from lossplug.metrics._token_stats import _metric_spec, _token_stats_update, _TokenStatsMetric
from lossplug.ops.stats import TokenStats

__all__ = ["Perplexity", "perplexity"]


def perplexity(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Perplexity of the scored tokens, float64 (nan when none is scored).

    Exact for bf16/fp16 logits: the softmax is computed in float32 a block at a time and the sums
    in float64, with no full-size probability tensor. float64 logits are scored in float64.

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import perplexity
        >>> uniform = torch.zeros(3, 4)  # four equally likely tokens
        >>> round(float(perplexity(uniform, torch.tensor([0, 1, 2]))), 6)
        4.0
    """
    spec = _metric_spec(ignore_index=ignore_index, shift=shift, softcap=softcap)
    # the formula lives in TokenStats, the one home of every derived value
    return _token_stats_update(preds, target, mask=mask, spec=spec, backend=backend).perplexity


class Perplexity(_TokenStatsMetric):
    """Perplexity over everything seen, never a mean of per-batch perplexities.

    Args:
        ignore_index: target value that is not scored.
        shift: score position ``t`` against ``target[..., t + 1]`` (causal LM).
        softcap: soft-cap applied to the logits before the softmax, as in the training loss.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for ``update(logits, target)``.
        kwargs: passed to :class:`torchmetrics.Metric` (``compute_on_cpu``, ``sync_on_compute``…).

    ``update`` takes ``(logits, target)``, a :class:`~lossplug.TokenStats`, or
    ``(losses, mask)`` of per-token negative log-likelihoods. States are float64/int64 sums
    reduced with ``sum``: the value is the same under DDP, gradient accumulation and any batching,
    and it survives ``state_dict``/``load_state_dict``.

    Example:
        >>> import torch
        >>> from lossplug.metrics import Perplexity
        >>> metric = Perplexity(shift=True)
        >>> logits = torch.zeros(2, 5, 8)  # uniform over 8 tokens
        >>> metric.update(logits, torch.randint(0, 8, (2, 5)))
        >>> round(float(metric.compute()), 6)
        8.0
    """

    higher_is_better = False
    plot_lower_bound = 1.0

    def compute(self) -> torch.Tensor:
        return self._checked_stats().perplexity
