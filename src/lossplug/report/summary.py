"""What a run says about each key: first, last and best value, each with its step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lossplug.loggers.run_reader import RunData
from lossplug.report.keys import declared_direction, is_number, key_group, select_keys


@dataclass(frozen=True)
class Point:
    """One logged value and the step it was logged at (``None`` if that row had no step)."""

    step: int | float | None
    value: float


@dataclass(frozen=True)
class Row:
    """The summary of one numeric history key.

    Attributes:
        key: The history key, e.g. ``"val/perplexity"``.
        group: ``"model"``, ``"business"`` or ``"other"``.
        first: The first value logged.
        last: The last value logged.
        best: The lowest or highest finite value (the earliest on a tie), ``None`` when the
            direction is unknown or no value is finite.
        direction: ``"min"``, ``"max"`` or ``None``.
        direction_from: ``"define_metric"`` (the run said so) or ``"name"`` (guessed), or
            ``None``.
        summary: ``"last"`` when the run's ``define_metric`` keeps only the last value (a total
            or a counter: no best, whatever its name suggests), else ``None``.
        points: How many numeric values were logged for the key.
    """

    key: str
    group: str
    first: Point
    last: Point
    best: Point | None
    direction: str | None
    direction_from: str | None
    summary: str | None
    points: int


@dataclass(frozen=True)
class PartInfo:
    """One part of a resumed run: the file, how it ended and how many rows it holds."""

    path: str
    state: str
    exit_code: int | None
    history_rows: int


@dataclass(frozen=True)
class RunInfo:
    """Who a run is and how it ended.

    Attributes:
        id: The run id, ``None`` when its run record could not be read.
        project: The W&B project, when recorded.
        name: The run's display name, when recorded.
        path: The ``.wandb`` file read.
        history_rows: How many ``run.log`` rows it holds.
        step_key: Its x-axis (:meth:`RunData.step_key <lossplug.loggers.RunData.step_key>`).
        last_step: The step of its last row that has one.
        state: ``"finished"``, ``"crashed"`` or ``"unfinished"``.
        complete: Whether its exit record was read.
        exit_code: The exit code of that record.
        parts: One :class:`PartInfo` per part of a resumed run, oldest first; empty for a run
            in one part.
    """

    id: str | None
    project: str | None
    name: str | None
    path: str
    history_rows: int
    step_key: str
    last_step: int | float | None
    state: str
    complete: bool
    exit_code: int | None
    parts: tuple[PartInfo, ...]


def run_info(run: RunData) -> RunInfo:
    """The :class:`RunInfo` of a run read back.

    Example:
        >>> from pathlib import Path
        >>> info = run_info(RunData(path=Path("r.wandb"), run_id="abc", history=[
        ...     {"_step": 0, "trainer/global_step": 7}], complete=True, exit_code=0))
        >>> info.id, info.state, info.last_step, info.step_key
        ('abc', 'finished', 7, 'trainer/global_step')
    """
    return RunInfo(
        id=run.run_id,
        project=run.project,
        name=run.name,
        path=str(run.path),
        history_rows=len(run.history),
        step_key=run.step_key(),
        last_step=last_step(run),
        state=run.state,
        complete=run.complete,
        exit_code=run.exit_code,
        parts=tuple(
            PartInfo(str(part.path), part.state, part.exit_code, len(part.history))
            for part in run.parts
        ),
    )


def run_label(run: RunData, given: str | None = None) -> str:
    """What to call a run: its display name, else ``given`` (the folder it was read from), else
    its id, else its file."""
    return run.name or given or run.run_id or str(run.path)


def summarize(run: RunData, keys: Iterable[str] | None = None) -> list[Row]:
    """One :class:`Row` per numeric key of the run, model metrics first, then KPIs.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the keys, as in :func:`~lossplug.report.select_keys`;
            ``None`` for all metrics but bookkeeping.

    Returns:
        The rows, in table order.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "trainer/global_step": 10, "val/perplexity": 8.0},
        ...     {"_step": 1, "trainer/global_step": 20, "val/perplexity": 5.5},
        ...     {"_step": 2, "trainer/global_step": 30, "val/perplexity": 6.0},
        ... ])
        >>> row, = summarize(run)
        >>> row.first, row.best, row.direction, row.points
        (Point(step=10, value=8.0), Point(step=20, value=5.5), 'min', 3)
    """
    rows = []
    for key in select_keys(run, keys):
        points = [Point(step, value) for step, value in run.values(key) if is_number(value)]
        direction, source, summary = declared_direction(run, key)
        finite = [p for p in points if math.isfinite(p.value)]
        best = None
        if direction and finite:
            # min()/max() keep the first of equal values: the earliest step reaching the best.
            best = (min if direction == "min" else max)(finite, key=lambda p: p.value)
        rows.append(
            Row(
                key=key,
                group=key_group(key),
                first=points[0],
                last=points[-1],
                best=best,
                direction=direction,
                direction_from=source,
                summary=summary,
                points=len(points),
            )
        )
    return rows


def last_step(run: RunData) -> int | float | None:
    """The step of the last history row that has one (see :meth:`RunData.step_key`)."""
    steps = [step for step, _ in run.series(run.step_key()) if is_number(step)]
    return steps[-1] if steps else None


def fmt_number(value: float | None) -> str:
    """A number in 4 significant digits; integers of up to 6 digits stay whole.

    Example:
        >>> [fmt_number(v) for v in (3.14159, 0.000123456, 250, 1234567, float("nan"), None)]
        ['3.142', '0.0001235', '250', '1.235e+06', 'nan', '-']
    """
    if value is None:
        return "-"
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if whole and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def fmt_point(point: Point | None) -> str:
    """``value @ step``, or ``-`` for no point."""
    if point is None:
        return "-"
    return f"{fmt_number(point.value)} @ {fmt_number(point.step)}"
