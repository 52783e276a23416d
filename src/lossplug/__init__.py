"""lossplug: exact cross-entropy and perplexity from fused kernels, beside your business KPIs."""

from lossplug import kpi, metrics
from lossplug.callbacks import KPIMonitor, LossMonitor
from lossplug.kpi import KPI, KPIContext, KPIResult
from lossplug.nn import FusedCrossEntropyLoss
from lossplug.ops import TokenStats, cross_entropy

__version__ = "0.1.0.dev0"

__all__ = [
    "KPI",
    "FusedCrossEntropyLoss",
    "KPIContext",
    "KPIMonitor",
    "KPIResult",
    "LossMonitor",
    "TokenStats",
    "__version__",
    "cross_entropy",
    "kpi",
    "metrics",
]
