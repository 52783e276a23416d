"""The model ↔ business link: perplexity and outcome KPIs, side by side at each evaluation.

A KPI such as a pass rate is worth optimising through perplexity only if the two move together.
:class:`LinkTable` keeps, for each evaluation step, ``val/perplexity`` and the value of every
outcome KPI (:attr:`~lossplug.KPI.outcome`) exactly as they were logged at that step, so that a
logger can write them as one table with a scatter plot per KPI. Framework-free: a trainer's
callback feeds it what it logs and hands its rows to a logger; its state goes in the callback's
checkpoint, so the table of a resumed run still starts at the first evaluation.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lossplug.kpi._core import KPI
from lossplug.kpi._isolation import isolated
from lossplug.monitoring.clock import CLOCK
from lossplug.monitoring.keys import is_bookkeeping

__all__ = ["LINK_X_KEY", "LinkTable", "Row", "Writer"]

#: The model-centric value every row is keyed on.
LINK_X_KEY = "val/perplexity"

#: One row of the table: the step, the model-centric value, then each KPI key's value (``None``
#: where the KPI logged nothing at that step).
Row = list[Any]
#: What writes a table out: ``write(columns, rows, kpi_keys)``, e.g. to a W&B run.
Writer = Callable[[list[str], list[Row], list[str]], None]


class LinkTable:
    """Each evaluation's ``val/perplexity`` beside the outcome KPIs logged at the same step.

    :meth:`record` takes everything a callback logs at a step and keeps the model-centric
    value (``x_key``) and the values of outcome KPIs: a KPI's own key ``kpi/<name>`` or its
    mapping entries ``kpi/<name>/<sub>``, never its cost and health counters (``*/seconds``,
    ``*/errors``…, ``*/reached_at_step``) nor its running totals (``cumulative``), and nothing
    of a KPI that measures the run rather than the model (``outcome=False``: throughput, cost,
    time to a target). The floats are kept as given, so the table holds the very values of the
    run's history. A key logged twice at one step keeps its last value.

    Args:
        kpis: the run's KPIs.
        x_key: the model-centric value each row is keyed on.

    Example:
        >>> links = LinkTable([KPI("pass_rate", len), KPI("cost", len, outcome=False)])
        >>> links.record(3, {"val/perplexity": 9.5, "val/tokens": 120.0})
        >>> links.record(3, {"kpi/pass_rate": 0.25, "kpi/pass_rate/seconds": 0.1, "kpi/cost": 2.0})
        >>> links.record(4, {"kpi/pass_rate": 0.5})  # no evaluation at step 4: no row
        >>> links.columns(), links.rows()
        (['step', 'val/perplexity', 'kpi/pass_rate'], [[3, 9.5, 0.25]])
    """

    def __init__(self, kpis: Sequence[KPI], *, x_key: str = LINK_X_KEY) -> None:
        # the longest name first: "kpi/a/b" belongs to a KPI named "a/b" before one named "a"
        self._kpis = sorted(kpis, key=lambda item: len(item.key), reverse=True)
        self.x_key = x_key
        self._steps: dict[int, dict[str, float]] = {}
        self._logged: tuple[list[str], list[Row]] | None = None
        self._warned = False

    def is_link_key(self, key: str) -> bool:
        """Whether ``key`` is a value of an outcome KPI, and so a column of the table.

        Example:
            >>> links = LinkTable([KPI("cost", len, cumulative=("total",))])
            >>> links.is_link_key("kpi/cost/per_token"), links.is_link_key("kpi/cost/total")
            (True, False)
        """
        if is_bookkeeping(key):
            return False
        for item in self._kpis:
            if key == item.key or key.startswith(item.key + "/"):
                return item.outcome and not item.is_cumulative(key)
        return False

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep the values of ``metrics``, logged at ``step``, that belong in the table."""
        kept = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and (key == self.x_key or self.is_link_key(key))
        }
        if not kept:
            return
        step = int(step)
        # steps only go forward: a past step without an evaluation will never get a row
        stale = [s for s, values in self._steps.items() if s < step and self.x_key not in values]
        for past in stale:
            del self._steps[past]
        self._steps.setdefault(step, {}).update(kept)

    def kpi_keys(self) -> list[str]:
        """The outcome KPI keys with a value at one evaluation step at least, in the order
        they were first logged."""
        keys: dict[str, None] = {}
        for values in self._evaluations().values():
            keys.update((key, None) for key in values if key != self.x_key)
        return list(keys)

    def columns(self) -> list[str]:
        """``step``, ``x_key``, then :meth:`kpi_keys`."""
        return ["step", self.x_key, *self.kpi_keys()]

    def rows(self) -> list[Row]:
        """One row per evaluation step, in step order, as :meth:`columns` names its cells."""
        keys = self.kpi_keys()
        return [
            [step, values[self.x_key], *(values.get(key) for key in keys)]
            for step, values in sorted(self._evaluations().items())
        ]

    def publish(self, write: Writer, *, step: int, only_if_changed: bool = False) -> bool:
        """Hand the table to ``write`` (a logger), unless it has no row or no outcome KPI.

        The call leaves training as it found it: its time is not training time, the random
        streams are put back, and an error is warned about once and never raised.

        Args:
            write: ``write(columns, rows, kpi_keys)``.
            step: the step it is logged at (only for the warning).
            only_if_changed: skip a table equal to the one last handed over (at the end of
                training, when the last evaluation already logged it).

        Returns:
            Whether ``write`` ran and returned.

        Example:
            >>> links = LinkTable([KPI("pass_rate", len)])
            >>> links.record(2, {"val/perplexity": 7.0, "kpi/pass_rate": 0.5})
            >>> links.publish(lambda columns, rows, keys: print(rows), step=2)
            [[2, 7.0, 0.5]]
            True
            >>> links.publish(print, step=2, only_if_changed=True)
            False
        """
        keys, rows = self.kpi_keys(), self.rows()
        if not keys or not rows:
            return False
        columns = ["step", self.x_key, *keys]
        if only_if_changed and self._logged is not None and _same(self._logged, (columns, rows)):
            return False
        try:
            # a logger's time is not training time, and its draws (if any) not training's
            with CLOCK.paused(self), isolated():
                write(columns, rows, keys)
        except Exception as exc:  # a full disk, a refused value: the table is lost, not the run
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"lossplug: the table linking {self.x_key} to the KPIs could not be logged "
                    f"at step {step} ({type(exc).__name__}: {exc}); training goes on, and later "
                    "tables are tried again",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return False
        self._logged = (columns, rows)
        return True

    def clear(self) -> None:
        """Forget every step: a new run starts."""
        self._steps = {}
        self._logged = None

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe data: the values kept at each step."""
        return {
            "version": 1,
            "steps": [[step, dict(values)] for step, values in sorted(self._steps.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = {
            int(step): {str(key): float(value) for key, value in values.items()}
            for step, values in state.get("steps", [])
        }
        self._logged = None  # the resumed run has not logged it yet

    def _evaluations(self) -> dict[int, dict[str, float]]:
        return {step: values for step, values in self._steps.items() if self.x_key in values}


def _same(a: tuple[list[str], list[Row]], b: tuple[list[str], list[Row]]) -> bool:
    """Equal tables, a NaN equal to a NaN (a diverged perplexity is still the same table)."""

    def canonical(table: tuple[list[str], list[Row]]) -> Any:
        columns, rows = table
        cells = [
            ["nan" if isinstance(c, float) and math.isnan(c) else c for c in row] for row in rows
        ]
        return columns, cells

    return canonical(a) == canonical(b)
