"""lossplug: exact cross-entropy and perplexity from fused kernels, beside your business KPIs.

The op, the module and the KPI core import with torch alone; the torchmetrics metrics, the
Lightning callbacks and the W&B helpers are loaded on first use, so ``import lossplug`` stays
cheap where only the loss is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from lossplug import kpi
from lossplug.kpi import KPI, KPIContext, KPIResult
from lossplug.nn import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
from lossplug.ops import TokenStats, cross_entropy, linear_cross_entropy

__version__ = "0.1.0.dev0"

_LAZY = {
    "KPIMonitor": ("lossplug.callbacks", "KPIMonitor"),
    "LossMonitor": ("lossplug.callbacks", "LossMonitor"),
    "callbacks": ("lossplug.callbacks", None),
    "integrations": ("lossplug.integrations", None),
    "loggers": ("lossplug.loggers", None),
    "metrics": ("lossplug.metrics", None),
}

__all__ = [
    "KPI",
    "FusedCrossEntropyLoss",
    "FusedLinearCrossEntropyLoss",
    "KPIContext",
    "KPIMonitor",
    "KPIResult",
    "LossMonitor",
    "TokenStats",
    "__version__",
    "callbacks",
    "cross_entropy",
    "integrations",
    "kpi",
    "linear_cross_entropy",
    "loggers",
    "metrics",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lossplug' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
