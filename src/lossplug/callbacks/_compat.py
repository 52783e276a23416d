"""Both Lightning namespaces: ``lightning.pytorch`` and the older ``pytorch_lightning``.

Each Trainer accepts only its own ``Callback`` class, so lossplug's callbacks derive from every
``Callback`` class that imports: one object then works with either Trainer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from typing_extensions import override

from lossplug.loggers.wandb import define_metric
from lossplug.monitoring.clock import CLOCK
from lossplug.monitoring.sums import gather_across_processes, identity, single_process

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


class OffTheTrainingClock(*CALLBACK_BASES):
    """A lossplug callback: validation time is not training time (``train/tokens_per_sec``, the
    ``Throughput`` KPI). Every lossplug callback pauses the process's training clock for a
    validation (two callbacks pausing for one are counted once), releases it should the
    validation raise, and starts each fit with it running."""

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        CLOCK.release_all()  # an earlier fit may have failed inside a validation

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        CLOCK.pause(self)

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        CLOCK.resume(self)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        CLOCK.resume(self)  # a validation that raised never reaches on_validation_end


def define_wandb_metrics(trainer: Any, summaries: Mapping[str, str | None]) -> None:
    """Declare each key on every W&B logger: x-axis the trainer's step, and its summary kind.

    Args:
        trainer: the Lightning trainer; loggers other than W&B's are left alone.
        summaries: W&B's summary kind of each logged key: ``"min"`` or ``"max"`` for values
            with a best, ``"last"`` for running totals (a count of tokens, the cost so far),
            ``None`` for W&B's default (also the last value). Keys holding ``*`` are not
            declared, since W&B reads ``*`` as a glob.
    """
    for logger in wandb_loggers(trainer):
        run = logger.experiment
        if not hasattr(run, "define_metric"):  # a disabled run
            continue
        run.define_metric("trainer/global_step")
        for key, summary in summaries.items():
            if "*" not in key:
                define_metric(run, key, summary=summary, step_key="trainer/global_step")


def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's W&B loggers, whichever namespace they come from."""
    found = []
    for logger in getattr(trainer, "loggers", []) or []:
        for klass in type(logger).__mro__:
            if klass.__name__ == "WandbLogger" and klass.__module__.endswith("loggers.wandb"):
                found.append(logger)
                break
    return found


def wandb_runs(trainer: Any) -> list[Any]:
    """The W&B runs of the trainer's W&B loggers (started if need be), disabled ones left out.

    Call it on rank zero only: elsewhere a logger's ``experiment`` is a stand-in.
    """
    runs = []
    for logger in wandb_loggers(trainer):
        run = logger.experiment
        if run is not None and not getattr(run, "disabled", False):
            runs.append(run)
    return runs


def rank_reduce(trainer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum over ranks through the trainer's strategy (the identity on one process)."""
    if trainer.world_size <= 1:
        return identity
    strategy = trainer.strategy
    # the collective runs on the strategy's device (NCCL needs CUDA tensors, gloo CPU ones)
    return lambda tensor: strategy.reduce(tensor.to(strategy.root_device), reduce_op="sum")


def gather_names(trainer: Any) -> Callable[[list[str]], list[list[str]]]:
    """Every rank's list of names (a collective under DDP; the identity on one process)."""
    return single_process if trainer.world_size <= 1 else gather_across_processes


def is_last_epoch(trainer: Any) -> bool:
    """Whether this is fit's last epoch by ``max_epochs``: the same on every rank, unlike
    ``trainer.should_stop``, which a callback may set on one rank only (the window's all-reduce
    would then wait forever)."""
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
