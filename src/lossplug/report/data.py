"""The report as plain JSON-ready data, built from the report's own dataclasses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from lossplug.loggers.run_reader import RunData
from lossplug.report.cost import CostOfImprovement, cost_of_improvement, find_cost_key
from lossplug.report.links import Link, link_kpis
from lossplug.report.summary import Row, run_info


def as_json(value: Any) -> Any:
    """``value`` with dataclasses as dicts of their fields, tuples as lists, NaN/inf as ``None``.

    Example:
        >>> from lossplug.report import Point
        >>> as_json([Point(3, float("nan")), (1, 2.5)])
        [{'step': 3, 'value': None}, [1, 2.5]]
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    return value


def report_dict(
    run: RunData,
    rows: Sequence[Row],
    *,
    links: Sequence[Link] | None = None,
    costs: Sequence[CostOfImprovement] | None = None,
) -> dict[str, Any]:
    """The report as plain JSON-ready data (non-finite numbers become ``None``).

    Args:
        run: The run read back.
        rows: From :func:`~lossplug.report.summarize`.
        links: From :func:`~lossplug.report.link_kpis`; ``None`` computes them for every KPI.
        costs: From :func:`~lossplug.report.cost_of_improvement`; ``None`` computes them for
            every KPI.

    Returns:
        ``{"run", "metrics", "links", "cost_key", "cost_per_improvement", "errors"}``: ``run``
        is :class:`~lossplug.report.RunInfo`, each metric a :class:`~lossplug.report.Row`, each
        link a :class:`~lossplug.report.Link` and each cost a
        :class:`~lossplug.report.CostOfImprovement`, as dicts of their fields (points as
        ``{"step", "value"}``); ``cost_key`` is the running cost total used (``None`` when the
        run logged none); ``errors`` what could not be read.
    """
    links = link_kpis(run) if links is None else links
    costs = cost_of_improvement(run) if costs is None else costs
    return {
        "run": as_json(run_info(run)),
        "metrics": as_json(rows),
        "links": as_json(links),
        "cost_key": costs[0].cost_key if costs else find_cost_key(run),
        "cost_per_improvement": as_json(costs),
        "errors": [str(error) for error in run.errors],
    }
