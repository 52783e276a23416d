"""The monitoring core: what lossplug's trainer callbacks share, free of any framework.

It imports neither Lightning nor ``transformers``: the Lightning callbacks
(:class:`~lossplug.LossMonitor`, :class:`~lossplug.KPIMonitor`) and the ``transformers``
``LossplugCallback`` are thin adapters over it, and a plain PyTorch or Fabric loop can drive it
directly.

- :mod:`~lossplug.monitoring.sums`: token sums per window and per slice, reduced when read;
- :mod:`~lossplug.monitoring.slices`: the slice label of each sequence;
- :mod:`~lossplug.monitoring.loss_check`: the trained loss against the monitor's cross-entropy;
- :mod:`~lossplug.monitoring.keys`: logged keys and their W&B summaries;
- :mod:`~lossplug.monitoring.clock`: training time, evaluation and KPI time left out;
- :mod:`~lossplug.monitoring.handoff`: statistics a patched model computed, a KPI's kept out;
- :mod:`~lossplug.monitoring.tracker`: :class:`LossTracker`, the model-centric numbers of a run;
- :mod:`~lossplug.monitoring.kpis`: :class:`KPISession`, the KPIs of a run;
- :mod:`~lossplug.monitoring.links`: :class:`LinkTable`, perplexity beside the outcome KPIs at
  each evaluation step.
"""

from lossplug.monitoring.clock import CLOCK, TrainingClock
from lossplug.monitoring.keys import METRIC_NAMES, SUMMARIES
from lossplug.monitoring.kpis import KPISession
from lossplug.monitoring.links import LinkTable
from lossplug.monitoring.tracker import LossTracker

__all__ = [
    "CLOCK",
    "METRIC_NAMES",
    "SUMMARIES",
    "KPISession",
    "LinkTable",
    "LossTracker",
    "TrainingClock",
]
