"""W&B specifics: a logger that works without an account, and an offline-run reader.

- :func:`wandb_logger` returns a Lightning ``WandbLogger`` that is online when the user is
  logged in to W&B and offline (a run ``wandb sync`` uploads later) otherwise.
- :func:`read_run` reads a run's ``.wandb`` file back, with no network: history, summary,
  ``define_metric`` definitions, config.
"""

from lossplug.loggers.run_reader import MetricDefinition, RunData, iter_records, read_run
from lossplug.loggers.wandb import (
    ModeChoice,
    RunLocation,
    api_key_source,
    describe_run,
    resolve_mode,
    wandb_logger,
)

__all__ = [
    "MetricDefinition",
    "ModeChoice",
    "RunData",
    "RunLocation",
    "api_key_source",
    "describe_run",
    "iter_records",
    "read_run",
    "resolve_mode",
    "wandb_logger",
]
