"""W&B specifics: a logger that works without an account, and an offline-run reader.

- :func:`wandb_logger` returns a Lightning ``WandbLogger`` that is online when the user is
  logged in to W&B and offline (a run ``wandb sync`` uploads later) otherwise.
- :func:`read_run` reads a run's ``.wandb`` file back, with no network: history, summary,
  ``define_metric`` definitions, config, and (from the run folder) logged tables and charts;
  :func:`find_runs` finds each run under a folder of several.
"""

from lossplug.loggers.run_reader import (
    DAMAGED,
    NO_EXIT,
    NOT_READ,
    Chart,
    MetricDefinition,
    ReadProblem,
    RunData,
    find_runs,
    iter_records,
    read_run,
)
from lossplug.loggers.wandb import (
    ModeChoice,
    RunLocation,
    api_key_source,
    describe_run,
    resolve_mode,
    wandb_logger,
)

__all__ = [
    "DAMAGED",
    "NOT_READ",
    "NO_EXIT",
    "Chart",
    "MetricDefinition",
    "ModeChoice",
    "ReadProblem",
    "RunData",
    "RunLocation",
    "api_key_source",
    "describe_run",
    "find_runs",
    "iter_records",
    "read_run",
    "resolve_mode",
    "wandb_logger",
]
