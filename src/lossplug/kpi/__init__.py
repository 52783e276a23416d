"""Business KPIs: user functions run on a schedule, safely, beside the model metrics.

The core here is framework-agnostic (plain PyTorch, Fabric, Lightning); ``lossplug.KPIMonitor``
is the Lightning adapter. Built-in KPIs live in :mod:`lossplug.kpi.builtin`.
"""

import sys
import types

from lossplug.kpi._core import DEFAULT_TIMEOUT_S, EVENTS, KPI, KPIContext, KPIResult, kpi
from lossplug.kpi._isolation import STOP_GRACE_S, KPICancelled
from lossplug.kpi._runner import KPIError, KPIOutcome, KPIRunner, KPIState

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EVENTS",
    "KPI",
    "STOP_GRACE_S",
    "KPICancelled",
    "KPIContext",
    "KPIError",
    "KPIOutcome",
    "KPIResult",
    "KPIRunner",
    "KPIState",
    "kpi",
]


class _CallableModule(types.ModuleType):
    """``lossplug.kpi`` is this package and, called, the ``@lossplug.kpi(...)`` decorator."""

    def __call__(self, *args, **kwargs):
        return kpi(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
