"""Both Lightning namespaces: ``lightning.pytorch`` and the older ``pytorch_lightning``.

Each Trainer accepts only its own ``Callback`` class, so lossplug's callbacks derive from every
``Callback`` class that imports: one object then works with either Trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


LIGHTNING_MODULES = tuple(m for m in map(_import, _NAMESPACES) if m is not None)
if not LIGHTNING_MODULES:
    raise ImportError(
        "lossplug.callbacks needs Lightning: pip install lightning (or pytorch-lightning)"
    )

CALLBACK_BASES: tuple[type, ...] = tuple(module.Callback for module in LIGHTNING_MODULES)


def define_wandb_metrics(trainer: Any, summaries: Mapping[str, str | None]) -> None:
    """Declare each key on every W&B logger: x-axis the trainer's step, and its summary kind."""
    for logger in wandb_loggers(trainer):
        run = logger.experiment
        if not hasattr(run, "define_metric"):  # a disabled run
            continue
        run.define_metric("trainer/global_step")
        for key, summary in summaries.items():
            kwargs = {"summary": summary} if summary else {}
            run.define_metric(key, step_metric="trainer/global_step", **kwargs)


def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's W&B loggers, whichever namespace they come from."""
    found = []
    for logger in getattr(trainer, "loggers", []) or []:
        for klass in type(logger).__mro__:
            if klass.__name__ == "WandbLogger" and klass.__module__.endswith("loggers.wandb"):
                found.append(logger)
                break
    return found
