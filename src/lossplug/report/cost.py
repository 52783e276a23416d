"""The cost of improvement: what a KPI's progress over a run cost.

It prices each KPI's progress with the run's cost, the running total that
:class:`~lossplug.kpi.builtin.TrainingCost` logs as ``kpi/<name>/total`` (``kpi/cost/total`` by
default): the cost spent between the KPI's first value and its best one, divided by the
improvement, shown per a round fraction of it (``kpi/pass_rate: 0.06 per +0.01``, in the unit of
the price the cost KPI was given). The cost at a step where it was not logged is interpolated
linearly between the steps around it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lossplug.loggers.run_reader import RunData
from lossplug.report.keys import (
    WORD_END,
    WORD_START,
    kpi_unit,
    metric_direction,
    numeric_keys,
    values_by_step,
)
from lossplug.report.links import linked_kpis
from lossplug.report.summary import Point, fmt_number

# The words of a KPI name that make its running total a cost (TrainingCost's "cost" and kin).
_COST_WORDS = re.compile(WORD_START + r"(?:costs?|price|usd|dollars?|spend|spent|bill)" + WORD_END)


@dataclass(frozen=True)
class CostOfImprovement:
    """What a KPI's improvement over the run cost (see :func:`cost_of_improvement`).

    Attributes:
        kpi: The KPI key.
        cost_key: The running cost total it is priced with, e.g. ``"kpi/cost/total"``.
        direction: ``"min"`` or ``"max"``: which way is an improvement.
        first: The KPI's first finite value.
        best: Its best value (the earliest on a tie).
        spent: The cost between ``first.step`` and ``best.step``; ``None`` when the cost is
            not known at both (not logged around them).
        improvement: ``best - first`` in the KPI's direction (> 0 when it improved).
        unit: The round step of improvement the cost is given for: ``10 ** (floor(log10(
            improvement)) - 1)``, e.g. 0.01 for an improvement of 0.5; ``None`` with no
            improvement.
        cost_per_unit: ``spent / improvement * unit``: the cost of one ``unit`` of improvement;
            ``None`` when there was no improvement or the cost is not known.
        note: Why ``cost_per_unit`` is ``None``, else ``None``.
        currency: The unit of the cost, as given to ``TrainingCost(currency=...)``; ``None``
            when the run did not record one.
    """

    kpi: str
    cost_key: str
    direction: str
    first: Point
    best: Point
    spent: float | None
    improvement: float
    unit: float | None
    cost_per_unit: float | None
    note: str | None = None
    currency: str | None = None


def find_cost_key(run: RunData) -> str | None:
    """The running cost total a :class:`~lossplug.kpi.builtin.TrainingCost` logged, if any.

    That is a ``kpi/<name>/total`` key whose ``<name>`` says cost (``cost``, ``price``, ``usd``,
    ``dollars``, ``spend``, ``bill``) or that has a ``kpi/<name>/per_million_tokens`` beside
    it; ``kpi/cost/total`` (the default name) first, else the first by name.

    Example:
        >>> from pathlib import Path
        >>> find_cost_key(RunData(path=Path("r.wandb"), history=[{"kpi/gpu_bill/total": 1.0}]))
        'kpi/gpu_bill/total'
    """
    keys = numeric_keys(run)
    found = [
        key
        for key in keys
        if key.startswith("kpi/")
        and key.endswith("/total")
        and (
            _COST_WORDS.search(key[: -len("/total")].lower())
            or key.removesuffix("/total") + "/per_million_tokens" in keys
        )
    ]
    if "kpi/cost/total" in found:
        return "kpi/cost/total"
    return found[0] if found else None


def cost_of_improvement(
    run: RunData,
    keys: Iterable[str] | None = None,
    *,
    cost_key: str | None = None,
    link: Iterable[str] = (),
) -> list[CostOfImprovement]:
    """What each KPI's improvement cost: the cost spent from its first to its best value.

    For each KPI with a direction (see :func:`~lossplug.report.keys.metric_direction`) and two or
    more finite values: ``spent = cost(best.step) - cost(first.step)``, ``improvement = best -
    first`` in the KPI's direction, and ``cost_per_unit = spent / improvement * unit``, the cost
    of one round ``unit`` of improvement (see :class:`CostOfImprovement`). The cost at a step is
    its value logged there, else interpolated linearly between the nearest steps before and
    after; outside the steps it was logged at, it is not known. Running totals, the cost KPI's
    own keys and KPIs that measure the run rather than the model (throughput, time to target)
    are not priced unless named in ``link``.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the KPIs, as in :func:`~lossplug.report.select_keys`;
            ``None`` for all.
        cost_key: The running cost total to use; ``None`` finds it (:func:`find_cost_key`).
        link: KPIs to price even though they measure the run, as in
            :func:`~lossplug.report.links.linked_kpis`.

    Returns:
        One entry per KPI, in table order; empty when the run logged no cost.

    Raises:
        ValueError: ``cost_key`` is not a numeric key of the run.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "kpi/cost/total": 1.0, "kpi/pass_rate": 0.25},
        ...     {"_step": 1, "kpi/cost/total": 2.0, "kpi/pass_rate": 0.75}])
        >>> item, = cost_of_improvement(run)
        >>> item.spent, item.improvement, item.unit, item.cost_per_unit
        (1.0, 0.5, 0.01, 0.02)
    """
    if cost_key is None:
        cost_key = find_cost_key(run)
        if cost_key is None:
            return []
    elif cost_key not in numeric_keys(run):
        raise ValueError(
            f"cost_key {cost_key!r} is not a numeric key of the run "
            f"(cost-like keys: {[k for k in numeric_keys(run) if k.endswith('/total')]})"
        )
    cost = sorted(values_by_step(run, cost_key).items())
    currency = kpi_unit(run, cost_key)
    owner = cost_key.rsplit("/", 1)[0] + "/"  # the cost KPI's own values are not priced
    out = []
    for kpi in linked_kpis(run, keys, link)[0]:
        direction, _ = metric_direction(run, kpi)
        if direction is None or kpi.startswith(owner) or kpi == owner[:-1]:
            continue
        points = [Point(step, value) for step, value in values_by_step(run, kpi).items()]
        if len(points) < 2:
            continue
        first = points[0]
        best = (min if direction == "min" else max)(points, key=lambda p: p.value)
        improvement = best.value - first.value if direction == "max" else first.value - best.value
        start, end = _interpolate(cost, first.step), _interpolate(cost, best.step)
        spent = None if start is None or end is None else end - start
        unit = cost_per_unit = note = None
        if improvement <= 0:
            note = "no improvement: the best value is the first"
        else:
            unit = 10.0 ** (math.floor(math.log10(improvement)) - 1)
            if spent is None:
                low, high = (cost[0][0], cost[-1][0]) if cost else (None, None)
                note = (
                    f"{cost_key} not known at steps {fmt_number(first.step)} and "
                    f"{fmt_number(best.step)} (logged from step {fmt_number(low)} to "
                    f"{fmt_number(high)})"
                )
            else:
                cost_per_unit = spent / improvement * unit
        out.append(
            CostOfImprovement(
                kpi=kpi,
                cost_key=cost_key,
                direction=direction,
                first=first,
                best=best,
                spent=spent,
                improvement=improvement,
                unit=unit,
                cost_per_unit=cost_per_unit,
                note=note,
                currency=currency,
            )
        )
    return out


def _interpolate(series: Sequence[tuple[int | float, float]], step: int | float) -> float | None:
    """The value at ``step`` of a series sorted by step, linear between points; ``None`` outside."""
    for (s0, v0), (s1, v1) in itertools.pairwise(series):
        if s0 <= step <= s1:
            if step == s0:
                return v0
            return v1 if step == s1 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    if len(series) == 1 and series[0][0] == step:
        return series[0][1]
    return None
