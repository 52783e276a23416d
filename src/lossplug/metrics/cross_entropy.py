"""Cross-entropy (mean negative log-likelihood per token): functional form and Metric."""

from __future__ import annotations

import torch

from lossplug.metrics._token_stats import _metric_spec, _token_stats_update, _TokenStatsMetric
from lossplug.ops.stats import TokenStats

__all__ = ["CrossEntropy", "cross_entropy"]


def cross_entropy(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy in nats per scored token, float64 (nan when none is scored).

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import cross_entropy
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> round(float(cross_entropy(logits, torch.tensor([0, 0]))), 4)
        1.1269
    """
    spec = _metric_spec(ignore_index=ignore_index, shift=shift, softcap=softcap)
    # the formula lives in TokenStats, the one home of every derived value
    return _token_stats_update(preds, target, mask=mask, spec=spec, backend=backend).mean_nll


class CrossEntropy(_TokenStatsMetric):
    """Cross-entropy over everything seen: ``Σ nll / Σ tokens``, exact across batches and ranks.

    The arguments and the update forms are those of :class:`~lossplug.metrics.Perplexity`,
    whose value is ``exp`` of this one.

    Example:
        >>> import torch
        >>> from lossplug.metrics import CrossEntropy
        >>> metric = CrossEntropy()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> round(float(metric.compute()), 4)
        1.1269
    """

    higher_is_better = False
    plot_lower_bound = 0.0

    def compute(self) -> torch.Tensor:
        return self._checked_stats().mean_nll
