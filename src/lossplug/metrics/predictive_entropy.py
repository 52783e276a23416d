"""Predictive entropy (mean entropy of the next-token distribution): functional and Metric."""

from __future__ import annotations

import torch

from lossplug.metrics._token_stats import _metric_spec, _token_stats_update, _TokenStatsMetric
from lossplug.ops.stats import TokenStats

__all__ = ["PredictiveEntropy", "predictive_entropy"]


def predictive_entropy(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean entropy in nats of the predictive distribution at the scored positions, float64.

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import predictive_entropy
        >>> uniform = torch.zeros(2, 4)
        >>> round(float(predictive_entropy(uniform, torch.tensor([0, 3]))), 6)  # log 4
        1.386294
    """
    spec = _metric_spec(ignore_index=ignore_index, shift=shift, softcap=softcap, full_stats=True)
    # the formula lives in TokenStats, the one home of every derived value
    return _token_stats_update(preds, target, spec=spec, backend=backend).entropy


class PredictiveEntropy(_TokenStatsMetric):
    """Mean predictive entropy over everything seen: how unsure the model is, in nats.

    A falling entropy with a flat cross-entropy is the mark of over-confidence.

    Example:
        >>> import torch
        >>> from lossplug.metrics import PredictiveEntropy
        >>> metric = PredictiveEntropy()
        >>> metric.update(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        >>> round(float(metric.compute()), 6)  # log 2
        0.693147
    """

    higher_is_better = None
    plot_lower_bound = 0.0
    _full_stats = True

    def compute(self) -> torch.Tensor:
        return self._checked_stats().entropy
