"""lossplug: exact cross-entropy and perplexity from fused kernels, beside your business KPIs."""

from lossplug import metrics
from lossplug.callbacks import LossMonitor
from lossplug.nn import FusedCrossEntropyLoss
from lossplug.ops import TokenStats, cross_entropy

__version__ = "0.1.0.dev0"

__all__ = [
    "FusedCrossEntropyLoss",
    "LossMonitor",
    "TokenStats",
    "__version__",
    "cross_entropy",
    "metrics",
]
