"""torchmetrics metrics over the fused pass: exact across batches, ranks and resumes."""

from lossplug.metrics import functional
from lossplug.metrics.cross_entropy import CrossEntropy
from lossplug.metrics.language_model import LanguageModelMetrics
from lossplug.metrics.perplexity import Perplexity
from lossplug.metrics.predictive_entropy import PredictiveEntropy
from lossplug.metrics.token_accuracy import TokenAccuracy

__all__ = [
    "CrossEntropy",
    "LanguageModelMetrics",
    "Perplexity",
    "PredictiveEntropy",
    "TokenAccuracy",
    "functional",
]
