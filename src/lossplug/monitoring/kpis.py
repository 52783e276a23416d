"""KPIs as every trainer runs them: what is due, what a KPI sees, and what it may not touch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lossplug.kpi._core import KPI, KPIContext
from lossplug.kpi._runner import KPIOutcome, KPIRunner
from lossplug.monitoring.clock import CLOCK
from lossplug.monitoring.handoff import calls_not_counted
from lossplug.monitoring.keys import kpi_summary


class KPISession:
    """The KPIs of one training run, driven by a trainer adapter.

    On top of :class:`~lossplug.kpi.KPIRunner` (schedule, timeout, errors, rank 0 and broadcast,
    the random streams and the model's modes left as found), a session keeps a KPI's model calls
    out of the monitors' numbers (statistics a patched model computes inside a KPI are dropped,
    and a training batch's waiting statistics are kept for the monitor, whatever the order of
    the callbacks), keeps KPI time out of the training clock, runs every cumulative KPI once
    more at the end of training (its last total is logged), gives KPIs the wall-clock and the
    training time, and names each logged key's W&B summary once.

    Args:
        kpis: the KPIs, as :class:`~lossplug.kpi.KPIRunner` takes them.

    Example:
        >>> from lossplug.kpi import KPI
        >>> session = KPISession([KPI("cost", lambda ctx: 1.0, every_n_steps=50, cumulative=True)])
        >>> [k.name for k in session.due("train_end", step=60, epoch=0)]
        ['cost']
    """

    def __init__(self, kpis: Sequence[KPI] | KPI) -> None:
        self.runner = KPIRunner(kpis)
        self._started = time.perf_counter()
        self._training_started = CLOCK.now()
        self._declared: set[str] = set()
        self.names_known = False

    @property
    def kpis(self) -> list[KPI]:
        return self.runner.kpis

    def start(self) -> None:
        """Training starts: ``ctx.elapsed_s`` and ``ctx.training_s`` count from now."""
        self._started = time.perf_counter()
        self._training_started = CLOCK.now()

    def due(self, event: str, *, step: int, epoch: int) -> list[KPI]:
        """The KPIs to run at ``event``; at ``"train_end"`` also every cumulative KPI that has
        not run at this step, so that the run's last total is logged."""
        due = self.runner.due(event, step=step, epoch=epoch)
        if event == "train_end":
            due += [
                item
                for item in self.kpis
                if item.cumulative
                and item not in due
                and self.runner.states[item.name].last_step < step
            ]
        return due

    def run(
        self,
        event: str,
        due: Iterable[KPI],
        *,
        step: int,
        epoch: int,
        model: Any,
        metrics: Mapping[str, float],
        is_rank_zero: bool = True,
        broadcast: Callable[[Any], Any] | None = None,
        **context: Any,
    ) -> list[tuple[KPI, KPIOutcome]]:
        """Run ``due`` at ``event`` and return each KPI's outcome; ``context`` fills the rest
        of :class:`~lossplug.KPIContext` (``device``, ``tokens``, ``samples``…)."""
        due = list(due)
        if not due:
            return []
        ctx = KPIContext(
            step=step,
            epoch=epoch,
            event=event,
            model=model,
            metrics=dict(metrics),
            elapsed_s=time.perf_counter() - self._started,
            training_s=CLOCK.now() - self._training_started,
            **context,
        )
        outcomes = []
        with CLOCK.paused(self), calls_not_counted(model):
            for item in due:
                outcome = self.runner.run(item, ctx, is_rank_zero=is_rank_zero, broadcast=broadcast)
                outcomes.append((item, outcome))
        return outcomes

    def summaries(self, keys: Iterable[str]) -> dict[str, str | None]:
        """W&B's summary of each key in ``keys`` not declared before (see
        :func:`~lossplug.monitoring.keys.kpi_summary`); each key is declared once."""
        new = {key: kpi_summary(key, self.kpis) for key in keys if key not in self._declared}
        self._declared.update(new)
        return new

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each KPI's :meth:`~lossplug.kpi.KPI.describe` by key, for the run's config: what a
        report needs to draw targets and units and to tell outcomes from the run's machinery."""
        return {item.key: item.describe() for item in self.kpis}

    def forget_declarations(self) -> None:
        """A new W&B run: every key is declared again."""
        self._declared = set()

    def check_lookups(self, known: Iterable[str], when: str) -> None:
        """Warn about keys KPIs looked up in ``ctx.metrics`` that no one logs; the first call
        marks the logged names as known (after the first evaluation, or at the end)."""
        self.names_known = True
        self.runner.warn_missing_metrics(known, when=when)

    def state_dict(self) -> dict[str, Any]:
        return self.runner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.runner.load_state_dict(state)


class ShowsKPISession:
    """What a trainer adapter shows of its :class:`KPISession` (``self.session``): the runner
    and the KPIs."""

    session: KPISession

    @property
    def runner(self) -> KPIRunner:
        """The :class:`~lossplug.kpi.KPIRunner` that calls the KPIs."""
        return self.session.runner

    @property
    def kpis(self) -> list[KPI]:
        return self.session.kpis
