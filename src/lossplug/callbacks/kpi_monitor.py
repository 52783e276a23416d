"""KPIMonitor: business KPIs on a schedule, logged beside the model metrics, from Lightning."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lossplug.callbacks._compat import (
    OffTheTrainingClock,
    define_wandb_metrics,
    wandb_loggers,
    wandb_runs,
)
from lossplug.callbacks.loss_monitor import LossMonitor
from lossplug.kpi._core import KPI
from lossplug.kpi._runner import KPIOutcome
from lossplug.loggers.wandb import log_link_table, write_kpi_config
from lossplug.monitoring.keys import is_bookkeeping
from lossplug.monitoring.kpis import KPISession, ShowsKPISession
from lossplug.monitoring.links import LinkTable

__all__ = ["KPIMonitor"]


class KPIMonitor(OffTheTrainingClock, ShowsKPISession):
    """Run :class:`~lossplug.KPI` functions on their schedules and log them as ``kpi/<name>``.

    Values go to every logger at the trainer's global step (the x-axis of the model metrics),
    with ``kpi/<name>/seconds`` for the cost of the call; mapping KPIs log ``kpi/<name>/<sub>``;
    sample rows become a W&B table ``kpi/<name>/samples`` when W&B logs (a column whose cells
    mix types, which W&B refuses, is logged as text; a table that still cannot be written is
    counted in ``kpi/<name>/table_errors`` and warned once, and the values are logged all the
    same). W&B summaries are ``max`` or ``min`` by ``higher_is_better``, and ``last`` for the
    values a KPI declares ``cumulative`` (a cumulative KPI also runs at the end of training, so
    its last total is logged). Every value (not the cost and health counters) also goes
    to ``trainer.callback_metrics``, so ``EarlyStopping``/``ModelCheckpoint`` and other KPIs
    (``ctx.metrics``) can read it. A failing, hanging or
    NaN-returning KPI never stops training (see :class:`~lossplug.kpi.KPIRunner`); under DDP a
    rank-zero KPI runs once and every rank sees its value. After the first validation (or at
    the end of training when there is none), a KPI that looked up a metric key that is not
    logged is warned about once, with the closest logged names. Schedules, best values and
    reached targets survive a resume.

    With a W&B logger, the run's config gets each KPI's description under ``lossplug_kpis``
    (direction, target, unit, ``outcome``…: :meth:`~lossplug.KPI.describe`), and the link
    between the model and the business is logged in W&B itself: after each validation's KPIs
    have run (and at the end of fit, if values came in since), a ``wandb.Table`` ``link/table``
    with columns ``step``, ``val/perplexity`` and each outcome KPI's values (not its cost and
    health counters, not running totals, not KPIs with ``outcome=False``), one row per
    validation step with the very values logged at that step, and a scatter plot
    ``link/<kpi key>`` of each KPI against ``val/perplexity``. ``val/perplexity`` is the value
    :class:`~lossplug.LossMonitor` logged (else the one in ``trainer.callback_metrics``); the
    rows survive a resume.

    A KPI never changes the run it measures: it finds the random streams as training left them
    and leaves them so, a call past its ``timeout_s`` is stopped at its next call into the model
    before training goes on, statistics a patched model computes inside a KPI are never counted
    as training or validation, and KPI time is not training time (``train/tokens_per_sec``).

    Args:
        kpis: the KPIs to run: a list of :class:`~lossplug.KPI` (or a single one).
        log_samples: log sample rows as tables.

    Raises:
        TypeError: ``kpis`` is not a list of KPIs, or ``log_samples`` is not a bool.
        ValueError: two KPIs share a name.

    Example:
        >>> import lossplug
        >>> monitor = lossplug.KPIMonitor([lossplug.KPI("steps", lambda ctx: ctx.step)])
        >>> [k.key for k in monitor.kpis]
        ['kpi/steps']
    """

    def __init__(self, kpis: Sequence[KPI] | KPI, *, log_samples: bool = True) -> None:
        self.session = KPISession(kpis)
        if not isinstance(log_samples, bool):
            raise TypeError(f"log_samples must be True or False, got {log_samples!r}")
        self.log_samples = log_samples
        self._seen_step = 0
        self._samples_seen = 0
        self.links = LinkTable(self.session.kpis)
        self._described: list[Any] = []  # the W&B runs whose config has the KPI descriptions

    # ---------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # each fit its own table, unless a checkpoint brings one back later
            self.links.clear()

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.start()
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
        self._run("train_step", trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._run("validation_end", trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            # every callback has logged its validation values (and run its KPIs) by now
            perplexity = _logged_perplexity(trainer, self.links.x_key)
            if perplexity is not None:
                self.links.record(trainer.global_step, {self.links.x_key: perplexity})
            self._log_links(trainer)
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and not self.session.names_known:
            self.session.check_lookups(
                _metrics(trainer), f"after the first validation (step {trainer.global_step})"
            )

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._run("train_epoch_end", trainer, pl_module)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._run("train_end", trainer, pl_module)
        self._log_links(trainer, only_if_changed=True)
        if not self.session.names_known:  # no validation ran
            self.session.check_lookups(_metrics(trainer), "by the end of training")

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self.session.forget_declarations()  # a new W&B run may start with this fit
        self._describe(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "runner": self.session.state_dict(),
            "samples_seen": self._samples_seen,
            "links": self.links.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict["runner"])
        self._samples_seen = int(state_dict.get("samples_seen", 0))
        self.links.load_state_dict(state_dict.get("links", {}))

    # -------------------------------------------------------------------------------- helpers
    def _run(self, event: str, trainer: Any, pl_module: Any) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        due = self.session.due(event, step=step, epoch=epoch)
        if not due:
            return
        broadcast = None
        if trainer.world_size > 1:
            strategy = trainer.strategy
            broadcast = lambda obj: strategy.broadcast(obj, src=0)  # noqa: E731
        metrics = _metrics(trainer)
        tokens = metrics.get("train/tokens")
        outcomes = self.session.run(
            event,
            due,
            step=step,
            epoch=epoch,
            model=pl_module,
            metrics=metrics,
            is_rank_zero=trainer.is_global_zero,
            broadcast=broadcast,
            device=pl_module.device,
            tokens=None if tokens is None else int(tokens),
            samples=self._samples_seen,
            world_size=trainer.world_size,
            trainer=trainer,
        )
        for item, outcome in outcomes:
            self._emit(item, outcome, trainer, step)
        if self.session.names_known:  # a key first looked up now is judged at once
            self.session.check_lookups(_metrics(trainer), f"at step {step}")

    def _emit(
        self,
        item: KPI,
        outcome: KPIOutcome,
        trainer: Any,
        step: int,
    ) -> None:
        if not outcome.metrics:
            return
        # every rank keeps them (the values are broadcast), so that any rank's checkpoint does
        self.links.record(step, outcome.metrics)
        if trainer.is_global_zero:
            self._describe(trainer)
            metrics = outcome.metrics
            if self.log_samples and outcome.samples:
                # the table first, so that a lost one is counted in the same row as the values
                metrics = {**metrics, **self._log_table(item, outcome.samples, trainer, step)}
            summaries = self.session.summaries(metrics)
            if summaries:
                define_wandb_metrics(trainer, summaries)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        # The values worth monitoring go where ModelCheckpoint, EarlyStopping and other KPIs
        # (ctx.metrics) read them: the trainer's callback metrics, the dict that
        # pl_module.log(..., logger=False) fills. Written there directly, since each
        # pl_module.log call moves the whole logged result to its device (most of what a cheap
        # KPI costs a step); CPU tensors, so that Lightning never synchronises with the device
        # to read them.
        monitored = {
            key: torch.tensor(float(value))
            for key, value in outcome.metrics.items()
            if not is_bookkeeping(key)
        }
        trainer.callback_metrics.update(monitored)

    def _describe(self, trainer: Any) -> None:
        """Write the KPI descriptions into the config of each W&B run not written yet."""
        if not trainer.is_global_zero:
            return
        for run in wandb_runs(trainer):
            if not any(run is done for done in self._described):
                self._described.append(run)
                write_kpi_config(run, self.session.describe(), writer="KPIMonitor")

    def _log_links(self, trainer: Any, *, only_if_changed: bool = False) -> None:
        """Log the link table and its scatter plots to every W&B run, on rank zero."""
        if not trainer.is_global_zero or not wandb_loggers(trainer):
            return
        step = trainer.global_step

        def write(columns: list[str], rows: list[list[Any]], kpi_keys: list[str]) -> None:
            for run in wandb_runs(trainer):
                log_link_table(run, columns, rows, kpi_keys, step, x_key=self.links.x_key)

        # publish() never raises: a lost table is warned about once
        self.links.publish(write, step=step, only_if_changed=only_if_changed)

    def _log_table(
        self, item: KPI, samples: list[dict[str, Any]], trainer: Any, step: int
    ) -> dict[str, float]:
        """Log the rows to every W&B logger; on failure, the table-error counter to log."""
        loggers = wandb_loggers(trainer)
        if not loggers:
            return {}
        try:
            columns, data = _table(samples)
            for logger in loggers:
                logger.log_table(key=f"{item.key}/samples", columns=columns, data=data, step=step)
        except Exception as exc:  # a full disk, a row W&B refuses: the table is lost, not the run
            return self.runner.record_table_error(item, exc, step=step)
        return {}


def _logged_perplexity(trainer: Any, key: str) -> float | None:
    """``key`` as the loggers got it at this validation, or ``None`` when it was not logged.

    A :class:`~lossplug.LossMonitor` logs its exact float; the trainer's callback metrics hold
    it rounded to float32. A value the module logged itself (``self.log``) went to the loggers
    as its callback metric's ``item()``.
    """
    for callback in trainer.callbacks:
        if isinstance(callback, LossMonitor) and callback.logged_val is not None:
            step, values = callback.logged_val
            if step == trainer.global_step and key in values:
                return float(values[key])
    value = trainer.callback_metrics.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None


def _metrics(trainer: Any) -> dict[str, float]:
    """What a KPI sees as ``ctx.metrics``: the trainer's one-number callback metrics."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = float(value)
    return metrics


def _table(samples: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells W&B accepts: plain values, one type per column (``None`` aside)."""
    keys = list(dict.fromkeys(key for row in samples for key in row))
    data = [[_cell(row.get(key)) for key in keys] for row in samples]
    for index in range(len(keys)):
        kinds = {_kind(row[index]) for row in data if row[index] is not None}
        if len(kinds) > 1:  # W&B refuses the whole table, so such a column is logged as text
            for row in data:
                if row[index] is not None:
                    row[index] = str(row[index])
    return [str(key) for key in keys], data


def _kind(value: Any) -> str:
    """W&B's type of a table cell: ints and floats are both numbers, bools are not."""
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "str"


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):  # also NumPy's integers
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
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
