"""torchmetrics metrics over the fused pass: exact across batches, ranks and resumes."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torchmetrics import Metric

from lossplug.metrics import functional
from lossplug.metrics.cross_entropy import CrossEntropy
from lossplug.metrics.language_model import LanguageModelMetrics
from lossplug.metrics.perplexity import Perplexity
from lossplug.metrics.predictive_entropy import PredictiveEntropy
from lossplug.metrics.token_accuracy import TokenAccuracy

__all__ = [
    "BY_NAME",
    "CrossEntropy",
    "LanguageModelMetrics",
    "MetricForms",
    "Perplexity",
    "PredictiveEntropy",
    "TokenAccuracy",
    "functional",
]


class MetricForms(NamedTuple):
    """The two forms of one metric: its torchmetrics class and its functional form.

    Example:
        >>> from lossplug.metrics import BY_NAME
        >>> forms = BY_NAME["entropy"]  # logged as train/entropy and val/entropy
        >>> forms.metric.__name__, forms.functional.__name__
        ('PredictiveEntropy', 'predictive_entropy')
    """

    metric: type[Metric]
    functional: Callable[..., torch.Tensor]


#: Every metric by the name its value is logged under (``train/<name>``, ``val/<name>``, the keys
#: of ``LanguageModelMetrics.compute()``): look a name up here rather than spell its class.
BY_NAME: dict[str, MetricForms] = {
    "cross_entropy": MetricForms(CrossEntropy, functional.cross_entropy),
    "perplexity": MetricForms(Perplexity, functional.perplexity),
    "token_accuracy": MetricForms(TokenAccuracy, functional.token_accuracy),
    "entropy": MetricForms(PredictiveEntropy, functional.predictive_entropy),
}
