"""Functional forms of the metrics: one call, one value, no state."""

from lossplug.metrics.cross_entropy import cross_entropy
from lossplug.metrics.language_model import language_model_metrics
from lossplug.metrics.perplexity import perplexity
from lossplug.metrics.predictive_entropy import predictive_entropy
from lossplug.metrics.token_accuracy import token_accuracy

__all__ = [
    "cross_entropy",
    "language_model_metrics",
    "perplexity",
    "predictive_entropy",
    "token_accuracy",
]
