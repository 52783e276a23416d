"""KPIMonitor: business KPIs on a schedule, logged beside the model metrics, from Lightning."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lossplug.callbacks._compat import CALLBACK_BASES, define_wandb_metrics, wandb_loggers
from lossplug.kpi._core import KPI, KPIContext
from lossplug.kpi._runner import KPIOutcome, KPIRunner

__all__ = ["KPIMonitor"]


class KPIMonitor(*CALLBACK_BASES):
    """Run :class:`~lossplug.KPI` functions on their schedules and log them as ``kpi/<name>``.

    Values go to every logger at the trainer's global step (the x-axis of the model metrics),
    with ``kpi/<name>/seconds`` for the cost of the call; mapping KPIs log ``kpi/<name>/<sub>``;
    sample rows become a W&B table ``kpi/<name>/samples`` when W&B logs. Values computed at
    validation end are also logged to the module, so ``EarlyStopping``/``ModelCheckpoint`` can
    monitor them. A failing, hanging or NaN-returning KPI never stops training (see
    :class:`~lossplug.kpi.KPIRunner`); under DDP a rank-zero KPI runs once and every rank sees
    its value. Schedules, best values and reached targets survive a resume.

    Args:
        kpis: the KPIs to run.
        log_samples: log sample rows as tables.

    Example:
        >>> import lossplug
        >>> monitor = lossplug.KPIMonitor([lossplug.KPI("steps", lambda ctx: ctx.step)])
        >>> [k.key for k in monitor.kpis]
        ['kpi/steps']
    """

    def __init__(self, kpis: Sequence[KPI] | KPI, *, log_samples: bool = True) -> None:
        self.runner = KPIRunner(kpis)
        self.log_samples = bool(log_samples)
        self._started = time.perf_counter()
        self._seen_step = 0
        self._samples_seen = 0
        self._defined: set[str] = set()

    @property
    def kpis(self) -> list[KPI]:
        return self.runner.kpis

    # ---------------------------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._started = time.perf_counter()
        self._seen_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples_seen += _batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation window
            return
        self._seen_step = step
        self._run("train_step", trainer, pl_module, can_log_to_module=True)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._run("validation_end", trainer, pl_module, can_log_to_module=True)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._run("train_epoch_end", trainer, pl_module, can_log_to_module=True)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # Lightning refuses pl_module.log here: loggers only
        self._run("train_end", trainer, pl_module, can_log_to_module=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runner": self.runner.state_dict(), "samples_seen": self._samples_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runner.load_state_dict(state_dict["runner"])
        self._samples_seen = int(state_dict.get("samples_seen", 0))

    # -------------------------------------------------------------------------------- helpers
    def _run(self, event: str, trainer: Any, pl_module: Any, *, can_log_to_module: bool) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        due = self.runner.due(event, step=step, epoch=epoch)
        if not due:
            return
        broadcast = None
        if trainer.world_size > 1:
            strategy = trainer.strategy
            broadcast = lambda obj: strategy.broadcast(obj, src=0)  # noqa: E731
        ctx = self._context(event, trainer, pl_module)
        for item in due:
            outcome = self.runner.run(
                item, ctx, is_rank_zero=trainer.is_global_zero, broadcast=broadcast
            )
            self._emit(item, outcome, trainer, pl_module, step, can_log_to_module)

    def _context(self, event: str, trainer: Any, pl_module: Any) -> KPIContext:
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                metrics[key] = float(value)
        tokens = metrics.get("train/tokens")
        return KPIContext(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            event=event,
            model=pl_module,
            metrics=metrics,
            device=pl_module.device,
            elapsed_s=time.perf_counter() - self._started,
            tokens=None if tokens is None else int(tokens),
            samples=self._samples_seen,
            world_size=trainer.world_size,
            trainer=trainer,
        )

    def _emit(
        self,
        item: KPI,
        outcome: KPIOutcome,
        trainer: Any,
        pl_module: Any,
        step: int,
        can_log_to_module: bool,
    ) -> None:
        if not outcome.metrics:
            return
        if trainer.is_global_zero:
            self._define_wandb_metrics(item, outcome.metrics, trainer)
            for logger in trainer.loggers:
                logger.log_metrics(outcome.metrics, step=step)
            if self.log_samples and outcome.samples:
                self._log_table(item, outcome.samples, trainer, step)
        if can_log_to_module:
            # only values worth monitoring (each pl_module.log costs ~0.3 ms); CPU tensors, so
            # that Lightning never synchronises with the device to read them
            for key, value in outcome.metrics.items():
                if not _is_bookkeeping(key):
                    pl_module.log(
                        key,
                        torch.tensor(float(value)),
                        logger=False,
                        sync_dist=False,
                        rank_zero_only=False,
                    )

    def _define_wandb_metrics(self, item: KPI, metrics: Mapping[str, float], trainer: Any) -> None:
        new = [key for key in metrics if key not in self._defined]
        if not new:
            return
        direction = "max" if item.higher_is_better else "min"
        define_wandb_metrics(
            trainer, {key: None if _is_bookkeeping(key) else direction for key in new}
        )
        self._defined.update(new)

    @staticmethod
    def _log_table(item: KPI, samples: list[dict[str, Any]], trainer: Any, step: int) -> None:
        columns = list(dict.fromkeys(key for row in samples for key in row))
        data = [[_cell(row.get(column)) for column in columns] for row in samples]
        for logger in wandb_loggers(trainer):
            logger.log_table(key=f"{item.key}/samples", columns=columns, data=data, step=step)


_BOOKKEEPING = ("seconds", "errors", "timeouts", "nonfinite", "reached_at_step")


def _is_bookkeeping(key: str) -> bool:
    """The cost and health counters of a KPI, as opposed to its values."""
    return key.rsplit("/", 1)[-1] in _BOOKKEEPING


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _batch_size(batch: Any) -> int:
    """Rows in the batch: the first dimension of its first tensor (0 when there is none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0
