"""Summaries of a W&B run read back from disk: a table of metrics and a grid of curves.

Plain functions over :class:`~lossplug.loggers.run_reader.RunData`, with no Lightning and no W&B
API, so the ``lossplug report`` command and a training script print the same thing::

    from lossplug.loggers import read_run
    from lossplug.report import format_table, plot_run, summarize

    run = read_run("checkpoints", wait=10)  # the save dir, a run folder or a .wandb file
    print(format_table(summarize(run), run))
    plot_run(run, "curves.png")  # needs the optional extra: pip install "lossplug[plot]"

What the table holds
--------------------

One row per numeric history key, in three groups:

- **model** metrics, keys under ``train/``, ``val/`` and ``test/`` (in that order, each sorted
  by name);
- **business** KPIs, keys under ``kpi/``, sorted by name;
- **other** numeric keys the run logged (a learning rate, a loss logged by hand, ...).

Bookkeeping keys are left out unless asked for by name (``keys=``): W&B's own ``_step``,
``_runtime``, ``_timestamp`` (and any key starting with ``_``), ``trainer/global_step``, ``epoch``,
and the KPI runner's ``*/seconds``, ``*/errors``, ``*/timeouts``, ``*/nonfinite`` and
``*/reached_at_step``. Tables and media are not numbers and never show.

Each row gives the first and last value with the step they were logged at, the best value and
its step, and the number of points. The step is ``trainer/global_step`` when the run has it
(Lightning's x-axis), else W&B's ``_step``.

The header says how the run ended (:attr:`RunData.state <lossplug.loggers.RunData.state>`):
``finished (exit code 0)``, ``CRASHED (exit code N)`` (its exit record has a non-zero code), or
``UNFINISHED`` (no exit record: still running or killed). A resumed run read from a folder is
shown whole, its parts merged (see :func:`lossplug.loggers.read_run`), with one line per part.

Which way is best
-----------------

1. The run's own ``define_metric``, for the key or a glob that matches it: a ``summary`` of
   ``"min"`` or ``"max"`` (exactly one of the two), shown as ``(min)``/``(max)``; a ``summary``
   of ``"last"`` (a total or a counter such as ``kpi/cost/total`` or ``train/tokens``): no best
   value, shown as ``- (last)``; else a ``goal`` of ``"minimize"``/``"maximize"``, shown as
   ``(min)``/``(max)``.
2. Otherwise a guess from the words of the key (split at ``/``, ``_``, ``-``, ``.``); a
   lower-is-better word wins over a higher-is-better one (``kpi/error_rate`` is ``min``):

   - lower is better: ``loss``, ``cross_entropy``, ``nll``, ``perplexity``, ``ppl``,
     ``entropy`` (lower = more confident), ``error``, ``fail``/``failure``, ``cost``, ``price``,
     ``usd``, ``seconds``, ``latency``, ``duration``, ``time_to``, ``wall``;
   - higher is better: ``accuracy``, ``acc``, ``rate``, ``speedup``, ``score``, ``tokens``,
     ``throughput``, ``per_sec``/``per_second``, ``pass``, ``success``, ``reward``, ``f1``,
     ``bleu``, ``rouge``, ``precision``, ``recall``, ``auc``.

   Shown as ``(min?)``/``(max?)``. A key that matches neither list gets no best value (``-``).

Non-finite values (NaN, ±inf) can be a first or last value, never the best one.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader import CRASHED, FINISHED, RunData

__all__ = [
    "PlotDependencyError",
    "Point",
    "Row",
    "fmt_number",
    "format_table",
    "guess_direction",
    "is_bookkeeping",
    "key_group",
    "last_step",
    "metric_direction",
    "numeric_keys",
    "plot_run",
    "problem_line",
    "report_dict",
    "select_keys",
    "summarize",
]

MODEL_PREFIXES = ("train/", "val/", "test/")
BUSINESS_PREFIXES = ("kpi/",)
GROUP_TITLES = {"model": "model metrics", "business": "business KPIs", "other": "other"}
_GROUP_ORDER = {"model": 0, "business": 1, "other": 2}
_BOOKKEEPING_KEYS = frozenset({"trainer/global_step", "epoch"})
# Written by the KPI runner beside each KPI: how long it took and how it failed, not its value.
_BOOKKEEPING_LEAVES = frozenset({"seconds", "errors", "timeouts", "nonfinite", "reached_at_step"})
_WORD_SEP = r"(?:^|(?<=[/_.\-\s]))"
_WORD_END = r"(?=$|[/_.\-\s])"
_LOWER_IS_BETTER = re.compile(
    _WORD_SEP
    + r"(?:loss(?:es)?|cross_entropy|nll|perplexity|ppl|entropy|errors?|err|fail(?:ures?|ed)?"
    r"|costs?|price|usd|seconds|latency|duration|time_to|wall)" + _WORD_END
)
_HIGHER_IS_BETTER = re.compile(
    _WORD_SEP + r"(?:accuracy|acc|rates?|speedups?|scores?|tokens?|throughput|per_sec(?:ond)?"
    r"|pass(?:ed)?|success(?:es)?|rewards?|f1|bleu|rouge\w*|precision|recall|auc)" + _WORD_END
)
_NOT_READ = "no exit record"  # the reader's message for a run without its end


class PlotDependencyError(ImportError):
    """matplotlib, needed by :func:`plot_run`, is not installed."""


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
        points: How many numeric values were logged for the key.
        summary: ``"last"`` when the run's ``define_metric`` keeps only the last value (a total
            or a counter: no best, whatever its name suggests), else ``None``.
    """

    key: str
    group: str
    first: Point
    last: Point
    best: Point | None
    direction: str | None
    direction_from: str | None
    points: int
    summary: str | None = None


def is_bookkeeping(key: str) -> bool:
    """Whether ``key`` is bookkeeping rather than a metric (see the module docs).

    Example:
        >>> [is_bookkeeping(k) for k in ("kpi/pass_rate", "kpi/pass_rate/seconds", "_runtime")]
        [False, True, True]
    """
    if key.startswith("_") or key in _BOOKKEEPING_KEYS:
        return True
    return "/" in key and key.rsplit("/", 1)[1] in _BOOKKEEPING_LEAVES


def key_group(key: str) -> str:
    """``"model"``, ``"business"`` or ``"other"``, from the key's prefix.

    Example:
        >>> key_group("val/perplexity"), key_group("kpi/speedup"), key_group("lr-AdamW")
        ('model', 'business', 'other')
    """
    if key.startswith(MODEL_PREFIXES):
        return "model"
    if key.startswith(BUSINESS_PREFIXES):
        return "business"
    return "other"


def guess_direction(key: str) -> str | None:
    """Guess ``"min"`` or ``"max"`` from the words of ``key``; ``None`` when no word says.

    Example:
        >>> [guess_direction(k) for k in ("train/perplexity", "kpi/pass_rate", "kpi/error_rate")]
        ['min', 'max', 'min']
        >>> guess_direction("train/tokens_per_sec"), guess_direction("kpi/cost/per_million_tokens")
        ('max', 'min')
        >>> guess_direction("lr-AdamW") is None
        True
    """
    lowered = key.lower()
    if _LOWER_IS_BETTER.search(lowered):
        return "min"
    if _HIGHER_IS_BETTER.search(lowered):
        return "max"
    return None


def metric_direction(run: RunData, key: str) -> tuple[str | None, str | None]:
    """Which way is best for ``key``, and where that came from.

    Returns:
        ``(direction, source)``: direction ``"min"``, ``"max"`` or ``None``; source
        ``"define_metric"``, ``"name"`` or ``None``. A key the run defined with
        ``summary="last"`` gives ``(None, "define_metric")``: it has no best.
    """
    direction, source, _ = _declared(run, key)
    return direction, source


def _declared(run: RunData, key: str) -> tuple[str | None, str | None, str | None]:
    """``(direction, source, summary)``; summary is ``"last"`` for a total or counter."""
    definitions = [run.metrics[key]] if key in run.metrics else []
    # An exact definition comes first; globs ("kpi/*") after, in the order they were defined.
    definitions += [d for d in run.metrics.values() if d.glob and fnmatch.fnmatchcase(key, d.name)]
    for definition in definitions:
        kinds = {"min", "max"} & set(definition.summary)
        if len(kinds) == 1:  # "min,max" asks for both and says nothing about which is better
            return kinds.pop(), "define_metric", None
        if "last" in definition.summary and not kinds:
            # A total or counter (cost so far, tokens seen): its lowest or highest value is
            # just its first or last, whatever its name suggests.
            return None, "define_metric", "last"
        if definition.goal in ("minimize", "maximize"):
            return definition.goal[:3], "define_metric", None
    guess = guess_direction(key)
    return guess, ("name" if guess else None), None


def numeric_keys(run: RunData) -> list[str]:
    """Every history key with at least one numeric value, bookkeeping included, in table order."""
    seen: dict[str, None] = {}
    for row in run.history:
        for key, value in row.items():
            if key not in seen and _is_number(value):
                seen[key] = None
    # By name within a group and stage: the same order whatever order the rows were logged in,
    # and a KPI's own sub-keys (kpi/x/...) right after it.
    return sorted(seen, key=lambda k: (_GROUP_ORDER[key_group(k)], _prefix_rank(k), k))


def select_keys(run: RunData, patterns: Iterable[str] | None = None) -> list[str]:
    """The numeric keys a report shows, in table order.

    Args:
        run: The run read back.
        patterns: Glob patterns (``fnmatch``, case-sensitive, ``*`` crosses ``/``) over the
            whole key; a pattern with no wildcard also matches the keys under it (``"kpi"``
            matches ``kpi/…``). A bookkeeping key shows only when a pattern names it: the key
            itself, or a glob whose last part is more than wildcards (``"*/seconds"``, ``"_*"``;
            not ``"kpi/*"``). ``None`` selects every numeric key but bookkeeping.

    Returns:
        Model keys first (``train/``, then ``val/``, then ``test/``), then ``kpi/`` keys, then
        the rest, each sorted by name.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "kpi/pass_rate": 0.5, "kpi/pass_rate/seconds": 2.0, "val/ppl": 9.0}])
        >>> select_keys(run), select_keys(run, ["kpi/*"]), select_keys(run, ["*/seconds"])
        (['val/ppl', 'kpi/pass_rate'], ['kpi/pass_rate'], ['kpi/pass_rate/seconds'])
    """
    keys = numeric_keys(run)
    if patterns is None:
        return [key for key in keys if not is_bookkeeping(key)]
    wanted = list(patterns)
    return [key for key in keys if _matches(key, wanted, names_only=is_bookkeeping(key))]


def summarize(run: RunData, keys: Iterable[str] | None = None) -> list[Row]:
    """One :class:`Row` per numeric key of the run, model metrics first, then KPIs.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the keys, as in :func:`select_keys`; ``None`` for all
            metrics but bookkeeping.

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
    step_key = run.step_key()
    rows = []
    for key in select_keys(run, keys):
        points = [
            Point(row.get(step_key), row[key])
            for row in run.history
            if key in row and _is_number(row[key])
        ]
        direction, source, summary = _declared(run, key)
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
                points=len(points),
                summary=summary,
            )
        )
    return rows


def last_step(run: RunData) -> int | float | None:
    """The step of the last history row that has one (``trainer/global_step`` or ``_step``)."""
    step_key = run.step_key()
    for row in reversed(run.history):
        if _is_number(row.get(step_key)):
            return row[step_key]
    return None


def problem_line(run: RunData) -> str | None:
    """One line saying what is wrong with a run read back, or ``None`` for a clean, whole run.

    Wrong is: the run crashed (its exit record has a non-zero exit code), has no exit record
    (still running or killed), or its file could not all be read.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run-x.wandb"), history=[{"_step": 0}], errors=[
        ...     "run-x.wandb: file ends inside a chunk at byte 900 (truncated)",
        ...     "run-x.wandb: no exit record: the run did not finish"])
        >>> print(problem_line(run))
        run-x.wandb: incomplete run: file ends inside a chunk at byte 900 (truncated); showing the 1 history row that could be read
        >>> print(problem_line(RunData(path=Path("run-x.wandb"), complete=True, exit_code=1)))
        run-x.wandb: the run crashed (exit code 1); showing the 0 history rows it logged
    """  # noqa: E501
    if run.state == FINISHED and not run.errors:
        return None
    shown = _plural(len(run.history), "history row")
    crashed = f"crashed (exit code {run.exit_code})"
    problems = [_strip_name(run, e) for e in run.errors if _NOT_READ not in e]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        state = "incomplete run" if not run.complete else "damaged run"
        if run.state == CRASHED:
            state += f", {crashed}"
        return f"{run.path}: {state}: {problems[0]}{more}; showing the {shown} that could be read"
    if run.state == CRASHED:
        return f"{run.path}: the run {crashed}; showing the {shown} it logged"
    return (
        f"{run.path}: the run has not finished (no exit record: still running or killed); "
        f"showing the {shown} written so far"
    )


def format_table(rows: Sequence[Row], run: RunData | None = None) -> str:
    """The rows as a text table; with ``run``, a header above and the read errors below.

    Values have 4 significant digits; ``best`` ends with the direction used: ``(min)`` and
    ``(max)`` come from the run's ``define_metric``, ``(min?)`` and ``(max?)`` are guessed from
    the key's name; ``- (last)`` is a total or counter the run defined with ``summary="last"``.

    Args:
        rows: From :func:`summarize`.
        run: The run the rows came from, for the header (id, project, name, path, history rows,
            last step, how the run ended, and the parts of a resumed run) and the errors.

    Returns:
        The text, without a trailing newline.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "kpi/pass_rate": 0.25}, {"_step": 1, "kpi/pass_rate": 0.5}])
        >>> print(format_table(summarize(run)))
        key              first     last     best            points
        business KPIs
          kpi/pass_rate  0.25 @ 0  0.5 @ 1  0.5 @ 1 (max?)       2
        <BLANKLINE>
        (min?)/(max?): direction guessed from the key's name
    """
    lines = [*_header(run), ""] if run is not None else []
    if rows:
        lines += _table(rows)
        notes = []
        if any(row.direction_from == "name" for row in rows):
            notes.append("(min?)/(max?): direction guessed from the key's name")
        if any(row.summary == "last" for row in rows):
            notes.append('(last): a total or counter (define_metric summary="last"): no best')
        lines += ["", *notes] if notes else []
    else:
        lines.append("(no numeric metrics to show)")
    if run is not None and run.errors:
        lines += ["", "read errors:"] + [f"  - {error}" for error in run.errors]
    return "\n".join(lines)


def report_dict(run: RunData, rows: Sequence[Row]) -> dict[str, Any]:
    """The report as plain JSON-ready data (non-finite numbers become ``None``).

    Returns:
        ``{"run": {...}, "metrics": [...], "errors": [...]}``. ``run`` has ``state``
        (``"finished"``, ``"crashed"`` or ``"unfinished"``), ``complete`` and ``exit_code``,
        and ``parts``: one ``{"path", "state", "exit_code", "history_rows"}`` per part of a
        resumed run, oldest first (empty for a run in one part). Each metric has ``key``,
        ``group``, ``first``/``last``/``best`` as ``{"step", "value"}`` (``best`` may be
        ``None``), ``direction``, ``direction_from``, ``summary`` (``"last"`` or ``None``) and
        ``points``.
    """

    def point(p: Point | None) -> dict[str, Any] | None:
        return None if p is None else {"step": _json_number(p.step), "value": _json_number(p.value)}

    return {
        "run": {
            "id": run.run_id,
            "project": run.project,
            "name": run.name,
            "path": str(run.path),
            "history_rows": len(run.history),
            "step_key": run.step_key(),
            "last_step": _json_number(last_step(run)),
            "state": run.state,
            "complete": run.complete,
            "exit_code": run.exit_code,
            "parts": [
                {
                    "path": str(part.path),
                    "state": part.state,
                    "exit_code": part.exit_code,
                    "history_rows": len(part.history),
                }
                for part in run.parts
            ],
        },
        "metrics": [
            {
                "key": row.key,
                "group": row.group,
                "first": point(row.first),
                "last": point(row.last),
                "best": point(row.best),
                "direction": row.direction,
                "direction_from": row.direction_from,
                "summary": row.summary,
                "points": row.points,
            }
            for row in rows
        ],
        "errors": list(run.errors),
    }


def plot_run(
    run: RunData, path: str | Path, keys: Iterable[str] | None = None, *, dpi: int = 100
) -> Path:
    """Draw the run's curves against the step, one small titled panel each, into an image.

    By default: one panel with the train and val (and test) perplexity, then one per KPI. With
    ``keys`` (patterns as in :func:`select_keys`), the matching keys; ``train/x``, ``val/x`` and
    ``test/x`` share a panel. The figure is drawn off screen (Agg, no display, pyplot's global
    state untouched); the format follows the file's suffix, PNG when it has none.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        path: The image file to write; missing parent folders are created.
        keys: Which keys to draw; ``None`` for the default above.
        dpi: Resolution of the image.

    Returns:
        The path written.

    Raises:
        PlotDependencyError: matplotlib is not installed (``pip install "lossplug[plot]"``).
        ValueError: No numeric key to draw.

    Example:
        ::

            plot_run(read_run("wandb"), "curves.png")
            plot_run(run, "kpis.png", keys=["kpi/*"])
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            'plotting needs matplotlib, an optional extra: pip install "lossplug[plot]"'
        ) from exc

    panels = _panels(_plot_keys(run, keys))
    if not panels:
        raise ValueError(
            f"{run.path}: nothing to plot: no numeric key"
            + ("" if keys is None else f" matches {list(keys)}")
        )
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    step_key = run.step_key()
    for ax, (title, members) in zip(axes, panels, strict=False):
        drawn = []
        for label, key in members:
            pts = [
                (row[step_key], row[key])
                for row in run.history
                if _is_number(row.get(step_key))
                and _is_number(row.get(key))
                and math.isfinite(row[key])
            ]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # Markers show where sparse values (a KPI every few hundred steps) really are.
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 40 else None, ms=3, lw=1.3)
            drawn.extend(ys)
        # Perplexity falls by orders of magnitude early on: a log axis keeps the end readable.
        if drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(step_key, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(_title(run), fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format=None if out.suffix else "png")
    return out


# ---------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(key: str, patterns: Sequence[str], *, names_only: bool = False) -> bool:
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        if names_only:
            # Only a pattern that names the key: itself, or a glob with a real last part.
            names = is_glob and pattern.rsplit("/", 1)[-1].strip("*?") != ""
            if pattern == key or (names and fnmatch.fnmatchcase(key, pattern)):
                return True
        elif fnmatch.fnmatchcase(key, pattern) or (
            not is_glob and key.startswith(pattern.rstrip("/") + "/")
        ):
            return True
    return False


def _prefix_rank(key: str) -> int:
    for rank, prefix in enumerate(MODEL_PREFIXES):
        if key.startswith(prefix):
            return rank
    return 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _strip_name(run: RunData, error: str) -> str:
    # The reader starts most messages with the file name, which the line already shows in full.
    prefix = f"{run.path.name}: "
    return error[len(prefix) :] if error.startswith(prefix) else error


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    return value


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


def _fmt_point(point: Point | None) -> str:
    if point is None:
        return "-"
    return f"{fmt_number(point.value)} @ {fmt_number(point.step)}"


def _title(run: RunData) -> str:
    where = "/".join(part for part in (run.project, run.name) if part)
    return f"run {run.run_id or '?'}" + (f"  {where}" if where else "")


def _header(run: RunData) -> list[str]:
    names = []
    if run.project:
        names.append(f"project {run.project}")
    if run.name:
        names.append(f"name {run.name}")
    step = last_step(run)
    lines = [
        "  ".join([f"run {run.run_id or '? (run record not read)'}", *names]),
        f"path {run.path}",
        f"{_plural(len(run.history), 'history row')}  last step {fmt_number(step)} "
        f"({run.step_key()})  "
        f"{_state(run)}",
    ]
    if run.parts:
        lines.append(f"resumed: {len(run.parts)} parts merged, each step once (the later wins)")
        lines += [
            f"  part {i}: {part.path}  {_plural(len(part.history), 'history row')}  {_state(part)}"
            for i, part in enumerate(run.parts, 1)
        ]
    return lines


def _state(run: RunData) -> str:
    # Upper case where something went wrong, so that it stands out in the header.
    code = "" if run.exit_code is None else f" (exit code {run.exit_code})"
    if run.state == FINISHED:
        return f"finished{code}"
    if run.state == CRASHED:
        return f"CRASHED{code}"
    return "UNFINISHED (no exit record: still running or killed)"


def _table(rows: Sequence[Row]) -> list[str]:
    # Values are right-aligned within their column so that the "@" signs line up.
    points = [(row.first, row.last, row.best) for row in rows]
    value_w = [max(len(fmt_number(p[i].value)) for p in points) for i in range(2)]
    has_best = [p[2] for p in points if p[2] is not None]
    value_w.append(max((len(fmt_number(p.value)) for p in has_best), default=1))

    def cell(point: Point | None, i: int, suffix: str = "") -> str:
        if point is None:
            return "-".rjust(value_w[i]) + suffix
        return f"{fmt_number(point.value).rjust(value_w[i])} @ {fmt_number(point.step)}{suffix}"

    cells = []
    for row in rows:
        mark = f" ({row.direction}{'?' if row.direction_from == 'name' else ''})"
        if row.summary == "last":
            mark = " (last)"
        elif row.best is None:
            mark = ""
        best = cell(row.best, 2, mark)
        cells.append(["  " + row.key, cell(row.first, 0), cell(row.last, 1), best, str(row.points)])
    head = ["key", "first", "last", "best", "points"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values: Sequence[str]) -> str:
        left = "  ".join(v.ljust(w) for v, w in zip(values[:4], widths, strict=False))
        return f"{left}  {values[4].rjust(widths[4])}".rstrip()

    out = [line(head)]
    group = None
    for row, values in zip(rows, cells, strict=True):
        if row.group != group:
            group = row.group
            out.append(GROUP_TITLES[group])
        out.append(line(values))
    return out


def _plot_keys(run: RunData, patterns: Iterable[str] | None) -> list[str]:
    if patterns is not None:
        return select_keys(run, patterns)
    keys = select_keys(run)
    chosen = [
        k
        for k in keys
        if (key_group(k) == "model" and k.rsplit("/", 1)[-1] == "perplexity")
        or key_group(k) == "business"
    ]
    return chosen or keys  # a run with neither: draw what it has


def _panels(keys: Sequence[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(title, [(label, key), ...]), ...]``: train/val/test of one metric share a panel."""
    panels: dict[tuple[bool, str], list[tuple[str, str]]] = {}
    for key in keys:
        if key_group(key) == "model":
            stage, name = key.split("/", 1)
            panels.setdefault((True, name), []).append((stage, key))
        else:
            panels.setdefault((False, key), []).append((key, key))
    return [(title, members) for (_, title), members in panels.items()]
