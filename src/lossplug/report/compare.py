"""Several runs side by side: one row per run, its perplexity, KPIs and cost, final and best.

A person fine-tuning compares learning rates, data mixes and checkpoints: each run gets the
same columns (``val/perplexity`` and its slices, every KPI that is not bookkeeping or a running
total, then the cost), so a glance down a column says which run did best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lossplug.loggers.run_reader import RunData
from lossplug.report.cost import find_cost_key
from lossplug.report.keys import (
    declared_direction,
    is_bookkeeping,
    is_number,
    kpi_keys,
    kpi_unit,
    numeric_keys,
    select_keys,
)
from lossplug.report.links import LINK_METRIC
from lossplug.report.plot import build_comparison_figure, save_figure
from lossplug.report.summary import Point, RunInfo, fmt_number, run_info, run_label
from lossplug.report.text import columns, plural


@dataclass(frozen=True)
class Final:
    """A key's final and best value in one run.

    Attributes:
        key: The history key.
        final: Its last finite value.
        best: Its best finite value (the earliest on a tie), ``None`` without a direction.
        direction: ``"min"``, ``"max"`` or ``None``
            (see :func:`~lossplug.report.keys.metric_direction`).
    """

    key: str
    final: Point
    best: Point | None
    direction: str | None


@dataclass(frozen=True)
class RunColumns:
    """One run's row of a comparison.

    Attributes:
        label: The name the table shows: the run's display name, else its id, else its file.
        run: Who the run is and how it ended.
        wall_seconds: Its wall-clock time (W&B's ``_runtime``), ``None`` when not recorded.
        values: Its :class:`Final` of each compared key it logged.
        cost_key: The running cost total it logged, ``None`` when none.
        cost: The last value of that total.
        currency: Its unit (``TrainingCost(currency=...)``), ``None`` when not recorded.
    """

    label: str
    run: RunInfo
    wall_seconds: float | None
    values: tuple[Final, ...]
    cost_key: str | None
    cost: float | None
    currency: str | None = None

    def get(self, key: str) -> Final | None:
        """The :class:`Final` of ``key``, ``None`` when this run did not log it."""
        return next((item for item in self.values if item.key == key), None)


def compared_keys(runs: Sequence[RunData], keys: Iterable[str] | None = None) -> list[str]:
    """The keys a comparison shows: ``val/perplexity`` and its slices, then every KPI value.

    Keys of any of the runs, in table order; KPIs exclude bookkeeping and running totals (the
    cost total has a column of its own). ``keys`` are glob patterns as in
    :func:`~lossplug.report.select_keys`.
    """
    wanted = None if keys is None else list(keys)
    found: dict[str, None] = {}
    for run in runs:
        for key in select_keys(run, wanted):
            slice_or_whole = key == LINK_METRIC or key.startswith(LINK_METRIC + "/")
            if slice_or_whole and not is_bookkeeping(key):
                found[key] = None
        found.update(dict.fromkeys(kpi_keys(run, wanted)))
    perplexities = [k for k in found if k.startswith(LINK_METRIC)]
    return sorted(perplexities) + [k for k in found if not k.startswith(LINK_METRIC)]


def compare_runs(
    runs: Sequence[RunData],
    keys: Iterable[str] | None = None,
    *,
    cost_key: str | None = None,
    labels: Sequence[str | None] | None = None,
) -> list[RunColumns]:
    """One :class:`RunColumns` per run, all over the same :func:`compared_keys`.

    Args:
        runs: Runs from :func:`lossplug.loggers.read_run`, in the order to show them.
        keys: Glob patterns choosing the keys, as in :func:`~lossplug.report.select_keys`.
        cost_key: The running cost total of the cost column; ``None`` finds each run's
            (:func:`~lossplug.report.find_cost_key`).
        labels: What to call each run where it has no display name (the folder it was read
            from; see :func:`~lossplug.report.summary.run_label`).

    Returns:
        The rows, in the order of ``runs``.

    Example:
        >>> from pathlib import Path
        >>> runs = [RunData(path=Path(f"{lr}.wandb"), name=lr, history=[
        ...     {"_step": 0, "val/perplexity": 9.0}, {"_step": 1, "val/perplexity": ppl}])
        ...     for lr, ppl in (("lr-1e-3", 7.5), ("lr-3e-3", 6.0))]
        >>> [(row.label, row.get("val/perplexity").final.value) for row in compare_runs(runs)]
        [('lr-1e-3', 7.5), ('lr-3e-3', 6.0)]
    """
    shown = compared_keys(runs, keys)
    labels = [None] * len(runs) if labels is None else list(labels)
    out = []
    for run, label in zip(runs, labels, strict=True):
        present = set(numeric_keys(run))
        values = [_final(run, key) for key in shown if key in present]
        cost = find_cost_key(run) if cost_key is None else cost_key
        # the summary's _runtime is whole seconds; the last row's is exact but may come before
        # the end of the run: the larger says more
        runtimes = [t for t in (run.summary.get("_runtime"), run.last("_runtime")) if is_number(t)]
        cost_final = None if cost is None else _final(run, cost)
        out.append(
            RunColumns(
                label=run_label(run, label),
                run=run_info(run),
                wall_seconds=float(max(runtimes)) if runtimes else None,
                values=tuple(item for item in values if item is not None),
                cost_key=cost,
                cost=None if cost_final is None else cost_final.final.value,
                currency=None if cost is None else kpi_unit(run, cost),
            )
        )
    return out


def format_comparison(rows: Sequence[RunColumns], unreadable: Sequence[str] = ()) -> str:
    """The comparison as a text table: one line per run, ``final (best)`` in each key's column.

    Args:
        rows: From :func:`compare_runs`.
        unreadable: One ``"<path>: <reason>"`` per run that could not be read, listed below.

    Returns:
        The text, without a trailing newline.

    Example:
        >>> from pathlib import Path
        >>> runs = [RunData(path=Path("a.wandb"), name="lr-3e-3", complete=True, exit_code=0,
        ...     history=[{"_step": 0, "val/perplexity": 9.0}, {"_step": 1, "val/perplexity": 6.0}])]
        >>> print(format_comparison(compare_runs(runs)))
        1 run compared; each cell: final (best@step)
        run      state     steps  wall  val/perplexity (min)
        lr-3e-3  finished      1     -  6 (6@1)
    """
    keys = list(dict.fromkeys(item.key for row in rows for item in row.values))
    directions = {item.key: item.direction for row in rows for item in row.values}
    costs = {row.cost_key for row in rows if row.cost_key}
    currencies = {row.currency for row in rows if row.cost_key}
    currency = currencies.pop() if len(currencies) == 1 else None  # one unit for all, or none
    cost_head = "cost" + (f" {currency}" if currency else "")
    cost_head += f" ({costs.pop()})" if len(costs) == 1 else ""
    head = ["run", "state", "steps", "wall"]
    head += [f"{key} ({directions[key]})" if directions[key] else key for key in keys]
    head += [cost_head] if any(row.cost_key for row in rows) else []
    cells = []
    for row in rows:
        line = [
            row.label,
            row.run.state,
            fmt_number(row.run.last_step),
            _fmt_seconds(row.wall_seconds),
            *(_fmt_final(row.get(key)) for key in keys),
        ]
        if len(head) > len(line):
            line.append(fmt_number(row.cost))
        cells.append(line)
    lines = [f"{plural(len(rows), 'run')} compared; each cell: final (best@step)"]
    lines += columns(head, cells, right={2, 3}) if rows else []
    if unreadable:
        lines += ["", "not read:", *(f"  - {item}" for item in unreadable)]
    return "\n".join(lines)


def plot_comparison(
    runs: Sequence[RunData],
    path: str | Path,
    keys: Iterable[str] | None = None,
    *,
    rows: Sequence[RunColumns] | None = None,
    dpi: int = 100,
) -> Path:
    """Overlay the runs' ``val/perplexity`` (and slices) and KPI curves into an image file.

    One panel per key of :func:`compared_keys` and one for the cost, one colour per run in every
    panel, each KPI's target as a dashed line (see
    :func:`~lossplug.report.plot.build_comparison_figure`).
    ``rows`` are the runs' :func:`compare_runs` (computed when not given): their labels name
    the runs in the legend, and their cost keys are drawn.

    Returns:
        The path written.

    Raises:
        PlotDependencyError: matplotlib is not installed (``pip install "lossplug[plot]"``).
        ValueError: No key to draw.
    """
    rows = compare_runs(runs, keys) if rows is None else rows
    costs = list(dict.fromkeys(row.cost_key for row in rows if row.cost_key))
    shown = compared_keys(runs, keys) + costs
    return save_figure(build_comparison_figure(runs, shown, [row.label for row in rows]), path, dpi)


def _final(run: RunData, key: str) -> Final | None:
    points = [
        Point(step, float(value))
        for step, value in run.values(key)
        if is_number(value) and math.isfinite(value)
    ]
    if not points:
        return None
    direction = declared_direction(run, key)[0]
    best = None
    if direction:
        best = (min if direction == "min" else max)(points, key=lambda p: p.value)
    return Final(key, points[-1], best, direction)


def _fmt_final(item: Final | None) -> str:
    if item is None:
        return "-"
    if item.best is None:
        return fmt_number(item.final.value)
    best = f"{fmt_number(item.best.value)}@{fmt_number(item.best.step)}"
    return f"{fmt_number(item.final.value)} ({best})"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
