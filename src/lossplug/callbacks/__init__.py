"""Lightning callbacks (both ``lightning.pytorch`` and ``pytorch_lightning`` Trainers)."""

from lossplug.callbacks.kpi_monitor import KPIMonitor
from lossplug.callbacks.loss_monitor import LossMonitor

__all__ = ["KPIMonitor", "LossMonitor"]
