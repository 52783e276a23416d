"""All the model-centric metrics of a language model from one pass: functional form and Metric."""

from __future__ import annotations

import torch

from lossplug.metrics._token_stats import _token_stats_update, _TokenStatsMetric
from lossplug.metrics.cross_entropy import _cross_entropy_compute
from lossplug.metrics.perplexity import _perplexity_compute
from lossplug.metrics.predictive_entropy import _predictive_entropy_compute
from lossplug.metrics.token_accuracy import _token_accuracy_compute
from lossplug.ops.stats import TokenStats

__all__ = ["LanguageModelMetrics", "language_model_metrics"]


def _language_model_metrics_compute(stats: TokenStats) -> dict[str, torch.Tensor]:
    return {
        "cross_entropy": _cross_entropy_compute(stats.nll_sum, stats.tokens),
        "perplexity": _perplexity_compute(stats.nll_sum, stats.tokens),
        "token_accuracy": _token_accuracy_compute(stats.correct, stats.tokens),
        "entropy": _predictive_entropy_compute(stats.entropy_sum, stats.tokens),
        "tokens": stats.tokens,
    }


def language_model_metrics(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Cross-entropy, perplexity, token accuracy, entropy and the token count from one pass.

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import language_model_metrics
        >>> values = language_model_metrics(torch.zeros(4, 2), torch.tensor([0, 1, 0, -100]))
        >>> round(float(values["perplexity"]), 6), int(values["tokens"])
        (2.0, 3)
    """
    stats = _token_stats_update(
        preds,
        target,
        ignore_index=ignore_index,
        shift=shift,
        softcap=softcap,
        backend=backend,
        needs_predictions=True,
    )
    return _language_model_metrics_compute(stats)


class LanguageModelMetrics(_TokenStatsMetric):
    """One update, every model-centric value: ``compute()`` returns a dict of float64 tensors.

    Keys: ``cross_entropy``, ``perplexity``, ``token_accuracy``, ``entropy`` and ``tokens``.

    Example:
        >>> import torch
        >>> from lossplug.metrics import LanguageModelMetrics
        >>> metric = LanguageModelMetrics(shift=True)
        >>> metric.update(torch.zeros(2, 4, 16), torch.randint(0, 16, (2, 4)))
        >>> values = metric.compute()
        >>> round(float(values["perplexity"]), 6), int(values["tokens"])
        (16.0, 6)
    """

    higher_is_better = None
    _needs_predictions = True

    def compute(self) -> dict[str, torch.Tensor]:
        return _language_model_metrics_compute(self._checked_stats())
