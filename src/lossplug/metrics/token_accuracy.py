"""Token accuracy (share of scored tokens whose argmax is the label): functional form and Metric."""

from __future__ import annotations

import torch

from lossplug.metrics._token_stats import _metric_spec, _token_stats_update, _TokenStatsMetric
from lossplug.ops.stats import TokenStats

__all__ = ["TokenAccuracy", "token_accuracy"]


def token_accuracy(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Share of scored tokens whose first maximum is the label, float64.

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import token_accuracy
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
        >>> float(token_accuracy(logits, torch.tensor([0, 0, -100])))
        0.5
    """
    spec = _metric_spec(ignore_index=ignore_index, shift=shift, softcap=softcap, full_stats=True)
    # the formula lives in TokenStats, the one home of every derived value
    return _token_stats_update(preds, target, spec=spec, backend=backend).accuracy


class TokenAccuracy(_TokenStatsMetric):
    """Top-1 token accuracy over everything seen (``update(logits, target)`` or ``update(stats)``).

    Example:
        >>> import torch
        >>> from lossplug.metrics import TokenAccuracy
        >>> metric = TokenAccuracy()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    _full_stats = True

    def compute(self) -> torch.Tensor:
        return self._checked_stats().accuracy
