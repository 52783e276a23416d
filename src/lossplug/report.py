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
and the KPI runner's ``*/seconds``, ``*/errors``, ``*/timeouts``, ``*/nonfinite``,
``*/table_errors`` and ``*/reached_at_step``. Tables and media are not numbers and never show.

Each row gives the first and last value with the step they were logged at, the best value and
its step, and the number of points. The step is ``trainer/global_step`` when the run has it
(Lightning's x-axis), else ``train/global_step`` (``transformers.Trainer``'s), else W&B's
``_step``.

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

Model ↔ business
----------------

Below the table, :func:`link_kpis` says how each KPI moved with perplexity over the run: its
Spearman rank correlation with ``val/perplexity`` and with every per-slice perplexity
``val/perplexity/<slice>``, over the validation steps.

- **Pairing:** a KPI value pairs with the metric's value logged at the *same step* (KPIs run
  after validation at the same global step, in a row of their own). When a key is logged more
  than once at a step, its last finite value there counts. Steps where either has no finite
  value are left out; nothing is interpolated.
- **Which KPIs:** every ``kpi/`` key that is not bookkeeping and not a running total
  (``define_metric`` ``summary="last"``, such as ``kpi/cost/total``: a total only grows with the
  step, so its correlation says nothing) with at least ``MIN_LINK_POINTS`` (3) points paired
  with ``val/perplexity``. A per-slice link is shown when it has that many pairs too.
- **Spearman:** the Pearson correlation of the ranks, ties given their average rank; exactly
  ``1.0`` or ``-1.0`` for a strictly monotone relation, ``None`` (``n/a``) when either series is
  constant.
- **Perplexity at target:** a KPI with a ``target`` logs ``kpi/<name>/reached_at_step`` once,
  when it first meets it; the link gives the metric's value logged at that step. A mapping KPI's
  target follows its ``primary`` entry, which the run does not record: it is given to an entry
  only when that entry is the mapping's only value.

:func:`cost_of_improvement` prices each KPI's progress with the run's cost, the running total
that :class:`~lossplug.kpi.builtin.TrainingCost` logs as ``kpi/<name>/total`` (``kpi/cost/total``
by default): the cost spent between the KPI's first value and its best one, divided by the
improvement, shown per a round fraction of it (``kpi/pass_rate: 0.06 per +0.01``, in the unit of
the price the cost KPI was given). The cost at a step where it was not logged is interpolated
linearly between the steps around it.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader import CRASHED, FINISHED, RunData

__all__ = [
    "LINK_METRIC",
    "MIN_LINK_POINTS",
    "CostOfImprovement",
    "Link",
    "PlotDependencyError",
    "Point",
    "Row",
    "build_figure",
    "cost_of_improvement",
    "find_cost_key",
    "fmt_number",
    "format_links",
    "format_table",
    "guess_direction",
    "is_bookkeeping",
    "key_group",
    "last_step",
    "link_kpis",
    "metric_direction",
    "numeric_keys",
    "plot_run",
    "problem_line",
    "report_dict",
    "select_keys",
    "spearman",
    "summarize",
]

MODEL_PREFIXES = ("train/", "val/", "test/")
BUSINESS_PREFIXES = ("kpi/",)
GROUP_TITLES = {"model": "model metrics", "business": "business KPIs", "other": "other"}
_GROUP_ORDER = {"model": 0, "business": 1, "other": 2}
_BOOKKEEPING_KEYS = frozenset({"trainer/global_step", "epoch"})
# Written by the KPI runner beside each KPI: how long it took and how it failed, not its value.
_BOOKKEEPING_LEAVES = frozenset(
    {"seconds", "errors", "timeouts", "nonfinite", "table_errors", "reached_at_step"}
)
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
# The model metric every KPI is linked to, and the prefix of its per-slice versions.
LINK_METRIC = "val/perplexity"
# Fewer pairs give a rank correlation of +-1 or 0 by construction, which says nothing.
MIN_LINK_POINTS = 3
# The words of a KPI name that make its running total a cost (TrainingCost's "cost" and kin).
_COST_WORDS = re.compile(_WORD_SEP + r"(?:costs?|price|usd|dollars?|spend|spent|bill)" + _WORD_END)
# The first panels of the default plot, in this order; any stage and slice of each shares one.
_HEADLINE_METRICS = ("perplexity", "cross_entropy", "token_accuracy")


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


@dataclass(frozen=True)
class Link:
    """How one KPI moved with one perplexity over the run (see the module docs).

    Attributes:
        kpi: The KPI key, e.g. ``"kpi/pass_rate"``.
        metric: ``"val/perplexity"`` or a per-slice ``"val/perplexity/<slice>"``.
        spearman: The Spearman rank correlation of the pairs, ``None`` when either series is
            constant (the correlation is undefined).
        points: How many (KPI, metric) pairs logged at the same step it is computed over.
        target_step: The step at which the KPI first met its target
            (``kpi/<name>/reached_at_step``), ``None`` when it did not or had none.
        perplexity_at_target: The metric's value logged at ``target_step``, ``None`` when there
            is none.
    """

    kpi: str
    metric: str
    spearman: float | None
    points: int
    target_step: int | float | None = None
    perplexity_at_target: float | None = None


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
    """The step of the last history row that has one (see :meth:`RunData.step_key`)."""
    step_key = run.step_key()
    for row in reversed(run.history):
        if _is_number(row.get(step_key)):
            return row[step_key]
    return None


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The Spearman rank correlation of two equally long series; ``None`` when undefined.

    Ties get their average rank; the result is the Pearson correlation of the ranks, so a
    strictly monotone relation gives exactly ``1.0`` or ``-1.0`` (the ranks are integers and
    half-integers, whose sums are exact in floating point). Undefined, hence ``None``: fewer
    than two pairs, or a series whose values are all equal.

    Args:
        xs: The first series (finite numbers).
        ys: The second series, as long as ``xs``.

    Raises:
        ValueError: The series differ in length.

    Example:
        >>> spearman([1.0, 2.0, 3.0], [9.0, 4.0, 1.0]), spearman([1, 2, 3], [1, 1, 2])
        (-1.0, 0.8660254037844387)
        >>> spearman([1, 2, 3], [5, 5, 5]) is None
        True
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must be as long as each other, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mean = (len(xs) + 1) / 2  # the mean of ranks 1..n, whatever the ties
    dx = [r - mean for r in rx]
    dy = [r - mean for r in ry]
    sxx = sum(d * d for d in dx)
    syy = sum(d * d for d in dy)
    if sxx == 0 or syy == 0:
        return None
    # sqrt(sxx * syy) == sxx exactly when the ranks are the same: a monotone relation is +-1.0.
    rho = sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, rho))


def link_kpis(run: RunData, keys: Iterable[str] | None = None) -> list[Link]:
    """Each KPI's Spearman correlation with ``val/perplexity`` and each per-slice perplexity.

    Pairing rule: a KPI value pairs with the perplexity logged at the *same step*
    (:meth:`RunData.step_key <lossplug.loggers.RunData.step_key>`, the trainer's global step
    when logged): KPIs run after validation at the same global step,
    usually in a history row of their own. The last finite value of a key at a step counts; a
    step where either has none is left out. A KPI is linked when it has at least
    :data:`MIN_LINK_POINTS` pairs with ``val/perplexity``; each ``val/perplexity/<slice>`` link
    needs as many pairs of its own. Running totals (``summary="last"``) are not linked.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the KPIs, as in :func:`select_keys`; ``None`` for all.

    Returns:
        One :class:`Link` per KPI and metric: KPIs in table order, each with ``val/perplexity``
        first, then its slices by name. Empty when the run has no ``val/perplexity``.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "val/perplexity": 9.0}, {"_step": 0, "kpi/pass_rate": 0.25},
        ...     {"_step": 1, "val/perplexity": 7.0}, {"_step": 1, "kpi/pass_rate": 0.5},
        ...     {"_step": 2, "val/perplexity": 6.5}, {"_step": 2, "kpi/pass_rate": 0.75}])
        >>> [(link.kpi, link.metric, link.spearman, link.points) for link in link_kpis(run)]
        [('kpi/pass_rate', 'val/perplexity', -1.0, 3)]
    """
    all_keys = numeric_keys(run)
    if LINK_METRIC not in all_keys:
        return []
    metrics = [LINK_METRIC] + [
        k for k in all_keys if k.startswith(LINK_METRIC + "/") and not is_bookkeeping(k)
    ]
    values = {key: _by_step(run, key) for key in metrics}
    links = []
    for kpi in _kpi_keys(run, keys):
        kpi_values = _by_step(run, kpi)
        target_step = _target_step(run, kpi, all_keys)
        for metric in metrics:
            steps = [s for s in kpi_values if s in values[metric]]
            if len(steps) < MIN_LINK_POINTS:
                if metric == LINK_METRIC:
                    break  # not a KPI logged at validation steps: no link at all
                continue
            at_target = None if target_step is None else values[metric].get(target_step)
            links.append(
                Link(
                    kpi=kpi,
                    metric=metric,
                    spearman=spearman(
                        [kpi_values[s] for s in steps], [values[metric][s] for s in steps]
                    ),
                    points=len(steps),
                    target_step=target_step,
                    perplexity_at_target=at_target,
                )
            )
    return links


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
    run: RunData, keys: Iterable[str] | None = None, *, cost_key: str | None = None
) -> list[CostOfImprovement]:
    """What each KPI's improvement cost: the cost spent from its first to its best value.

    For each KPI with a direction (see :func:`metric_direction`) and two or more finite
    values: ``spent = cost(best.step) - cost(first.step)``, ``improvement = best - first`` in the
    KPI's direction, and ``cost_per_unit = spent / improvement * unit``, the cost of one round
    ``unit`` of improvement (see :class:`CostOfImprovement`). The cost at a step is its value
    logged there, else interpolated linearly between the nearest steps before and after; outside
    the steps it was logged at, it is not known. Running totals and the cost KPI's own keys are
    not priced.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the KPIs, as in :func:`select_keys`; ``None`` for all.
        cost_key: The running cost total to use; ``None`` finds it (:func:`find_cost_key`).

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
    cost = sorted(_by_step(run, cost_key).items())
    owner = cost_key.rsplit("/", 1)[0] + "/"  # the cost KPI's own values are not priced
    out = []
    for kpi in _kpi_keys(run, keys):
        direction, _ = metric_direction(run, kpi)
        if direction is None or kpi.startswith(owner) or kpi == owner[:-1]:
            continue
        points = [Point(step, value) for step, value in _by_step(run, kpi).items()]
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
            )
        )
    return out


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


def format_table(
    rows: Sequence[Row],
    run: RunData | None = None,
    *,
    links: Sequence[Link] | None = None,
    costs: Sequence[CostOfImprovement] | None = None,
) -> str:
    """The rows as a text table; with ``run``, a header above and the read errors below.

    Values have 4 significant digits; ``best`` ends with the direction used: ``(min)`` and
    ``(max)`` come from the run's ``define_metric``, ``(min?)`` and ``(max?)`` are guessed from
    the key's name; ``- (last)`` is a total or counter the run defined with ``summary="last"``.
    With ``run``, the "model ↔ business" section (:func:`format_links`) follows the table.

    Args:
        rows: From :func:`summarize`.
        run: The run the rows came from, for the header (id, project, name, path, history rows,
            last step, how the run ended, and the parts of a resumed run), the model ↔ business
            section and the errors.
        links: The links to show; ``None`` computes them for every KPI (:func:`link_kpis`).
        costs: The costs of improvement to show; ``None`` computes them for every KPI
            (:func:`cost_of_improvement`).

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
    if run is not None:
        links = link_kpis(run) if links is None else links
        costs = cost_of_improvement(run) if costs is None else costs
        section = format_links(links, costs, run)
        lines += ["", section] if section else []
    if run is not None and run.errors:
        lines += ["", "read errors:"] + [f"  - {error}" for error in run.errors]
    return "\n".join(lines)


def format_links(
    links: Sequence[Link],
    costs: Sequence[CostOfImprovement] = (),
    run: RunData | None = None,
) -> str:
    """The "model ↔ business" section: one line per link, then one per cost of improvement.

    No line starts with a key or with indentation, so that a line of the metrics table above
    stays the only one to start with its key. ``spearman`` has 3 decimals (``n/a`` when
    undefined); "perplexity at target" is ``value @ step``.

    Args:
        links: From :func:`link_kpis`.
        costs: From :func:`cost_of_improvement`.
        run: The run, to say why there is no link when it logged KPIs and none of them links;
            ``None`` says nothing.

    Returns:
        The text without a trailing newline; ``""`` when there is nothing to say.

    Example:
        >>> print(format_links([Link("kpi/pass_rate", "val/perplexity", -1.0, 3, 80, 12.5)]))
        model ↔ business: Spearman rank correlation of each KPI with perplexity over the run
        (a KPI value pairs with the perplexity logged at the same step; n/a: a constant series)
        spearman  points  KPI            metric          perplexity at target
        -1.000         3  kpi/pass_rate  val/perplexity  12.5 @ 80
    """
    lines = []
    if links:
        lines += [
            "model ↔ business: Spearman rank correlation of each KPI with perplexity over the run",
            "(a KPI value pairs with the perplexity logged at the same step; n/a: a constant "
            "series)",
        ]
        cells = [
            [
                "n/a" if link.spearman is None else f"{link.spearman:+.3f}",
                str(link.points),
                link.kpi,
                link.metric,
                _fmt_target(link),
            ]
            for link in links
        ]
        head = ["spearman", "points", "KPI", "metric", "perplexity at target"]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        for values in [head, *cells]:
            parts = [values[0].ljust(widths[0]), values[1].rjust(widths[1])]
            parts += [v.ljust(w) for v, w in zip(values[2:], widths[2:], strict=True)]
            lines.append("  ".join(parts).rstrip())
    elif run is not None and _kpi_keys(run, None) and not link_kpis(run):
        # Said only when no KPI of the whole run links (not when --keys left them out).
        why = (
            f"no {LINK_METRIC} logged"
            if LINK_METRIC not in numeric_keys(run)
            else f"no KPI has {MIN_LINK_POINTS} or more values logged at steps with {LINK_METRIC}"
        )
        lines.append(f"model ↔ business: {why}")
    if costs:
        lines += [""] if lines else []
        lines.append(
            f"cost of improvement ({costs[0].cost_key} from each KPI's first value to its best):"
        )
        for item in costs:
            lines.append(f"{item.kpi}: {_fmt_cost(item)}")
    return "\n".join(lines)


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
        rows: From :func:`summarize`.
        links: From :func:`link_kpis`; ``None`` computes them for every KPI.
        costs: From :func:`cost_of_improvement`; ``None`` computes them for every KPI.

    Returns:
        ``{"run": {...}, "metrics": [...], "links": [...], "cost_key": ...,
        "cost_per_improvement": [...], "errors": [...]}``. ``run`` has ``state``
        (``"finished"``, ``"crashed"`` or ``"unfinished"``), ``complete`` and ``exit_code``,
        and ``parts``: one ``{"path", "state", "exit_code", "history_rows"}`` per part of a
        resumed run, oldest first (empty for a run in one part). Each metric has ``key``,
        ``group``, ``first``/``last``/``best`` as ``{"step", "value"}`` (``best`` may be
        ``None``), ``direction``, ``direction_from``, ``summary`` (``"last"`` or ``None``) and
        ``points``. Each link (:class:`Link`) has ``kpi``, ``metric``, ``spearman`` (``None``
        when undefined), ``points``, ``target_step`` and ``perplexity_at_target`` (``None``
        when the KPI met no target). ``cost_key`` is the running cost total used (``None`` when
        the run logged none), and each ``cost_per_improvement`` entry
        (:class:`CostOfImprovement`) has ``kpi``, ``cost_key``, ``direction``, ``first`` and
        ``best`` as ``{"step", "value"}``, ``spent``, ``improvement``, ``unit``,
        ``cost_per_unit`` (the cost of one ``unit`` of improvement, ``None`` when unknown) and
        ``note`` (why it is ``None``).
    """

    def point(p: Point | None) -> dict[str, Any] | None:
        return None if p is None else {"step": _json_number(p.step), "value": _json_number(p.value)}

    links = link_kpis(run) if links is None else links
    costs = cost_of_improvement(run) if costs is None else costs

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
        "links": [
            {
                "kpi": link.kpi,
                "metric": link.metric,
                "spearman": _json_number(link.spearman),
                "points": link.points,
                "target_step": _json_number(link.target_step),
                "perplexity_at_target": _json_number(link.perplexity_at_target),
            }
            for link in links
        ],
        "cost_key": costs[0].cost_key if costs else find_cost_key(run),
        "cost_per_improvement": [
            {
                "kpi": item.kpi,
                "cost_key": item.cost_key,
                "direction": item.direction,
                "first": point(item.first),
                "best": point(item.best),
                "spent": _json_number(item.spent),
                "improvement": _json_number(item.improvement),
                "unit": _json_number(item.unit),
                "cost_per_unit": _json_number(item.cost_per_unit),
                "note": item.note,
            }
            for item in costs
        ],
        "errors": list(run.errors),
    }


def plot_run(
    run: RunData, path: str | Path, keys: Iterable[str] | None = None, *, dpi: int = 100
) -> Path:
    """Draw the run's figure (:func:`build_figure`) into an image file.

    The figure is drawn off screen (Agg, no display, pyplot's global state untouched); the
    format follows the file's suffix, PNG when it has none.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        path: The image file to write; missing parent folders are created.
        keys: Which keys to draw, as in :func:`build_figure`.
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
    fig = build_figure(run, keys)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format=None if out.suffix else "png")
    return out


def build_figure(run: RunData, keys: Iterable[str] | None = None) -> Any:
    """The run's curves against the step, and each KPI against ``val/perplexity``.

    By default, the first row holds the model: perplexity on a log axis (train, val and test,
    and every per-slice ``val/perplexity/<slice>``), then cross-entropy and token accuracy when
    logged; each KPI gets a panel in the rows below; all of these share the step axis. Then one
    scatter per linked KPI (:func:`link_kpis`): the KPI against ``val/perplexity`` (log axis),
    each point marked with its step, the Spearman correlation in the title. With ``keys``
    (patterns as in :func:`select_keys`), the matching keys are drawn the same way (model
    panels first, then KPIs, then other keys), and the scatters of the matching KPIs.

    Panels are titled by metric (``"perplexity"``, ``"cross_entropy"``, ...): ``train/x``,
    ``val/x``, ``test/x`` and their slices ``val/x/<slice>`` share one, labelled ``val``,
    ``val/<slice>``, ...; a KPI panel is titled by its key; a scatter
    ``"<kpi> vs val/perplexity"``. A perplexity panel's y axis is logarithmic (it falls by
    orders of magnitude early on, which flattens the rest on a linear axis), as is any panel
    whose values span more than a factor of 20.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Which keys to draw; ``None`` for the default above.

    Returns:
        A ``matplotlib.figure.Figure`` with an Agg canvas (not registered with pyplot).

    Raises:
        PlotDependencyError: matplotlib is not installed (``pip install "lossplug[plot]"``).
        ValueError: No numeric key to draw.

    Example:
        ::

            fig = build_figure(read_run("wandb"))
            ppl = next(ax for ax in fig.axes if ax.get_title() == "perplexity")
            assert ppl.get_yscale() == "log"
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            'plotting needs matplotlib, an optional extra: pip install "lossplug[plot]"'
        ) from exc

    wanted = None if keys is None else list(keys)
    panels = _panels(_plot_keys(run, wanted))
    if not panels:
        raise ValueError(
            f"{run.path}: nothing to plot: no numeric key"
            + ("" if wanted is None else f" matches {wanted}")
        )
    scatters = [link for link in link_kpis(run, wanted) if link.metric == LINK_METRIC]
    model = [panel for panel in panels if panel[2] == "model"]
    rest = [panel for panel in panels if panel[2] != "model"]
    cols = min(3, max(len(model), len(rest), len(scatters)))
    # Model on top, KPIs (and other keys) below, scatters last: each block starts a new row.
    blocks = [model, rest, scatters]
    nrows = sum(math.ceil(len(block) / cols) for block in blocks)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, cols)
    cells = []
    row = 0
    for block in blocks:
        cells.append([grid[row + i // cols, i % cols] for i in range(len(block))])
        row += math.ceil(len(block) / cols)

    step_key = run.step_key()
    shared = None
    for (title, members, _), cell in zip(model + rest, cells[0] + cells[1], strict=True):
        ax = fig.add_subplot(cell, sharex=shared)
        shared = shared or ax
        _draw_curves(ax, run, title, members, step_key)
    pairs = {key: _by_step(run, key) for key in {LINK_METRIC, *(s.kpi for s in scatters)}}
    for link, cell in zip(scatters, cells[2], strict=True):
        _draw_scatter(fig.add_subplot(cell), link, pairs[link.kpi], pairs[LINK_METRIC])
    fig.suptitle(_title(run), fontsize=11)
    return fig


def _draw_curves(
    ax: Any, run: RunData, title: str, members: Sequence[tuple[str, str]], step_key: str
) -> None:
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
    positive = bool(drawn) and min(drawn) > 0
    # Perplexity falls by orders of magnitude early on: a log axis keeps the end readable.
    if positive and (title == "perplexity" or max(drawn) / min(drawn) > 20):
        ax.set_yscale("log")
        if min(drawn) >= 1:
            _plain_log_ticks(ax.yaxis)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(step_key, fontsize=8)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3)
    if len(members) > 1:
        ax.legend(fontsize=8)


def _plain_log_ticks(axis: Any) -> None:
    from matplotlib.ticker import LogFormatter

    # "20" rather than "2x10^1": a perplexity (>= 1) reads as a plain number. LogFormatter still
    # labels minor ticks only where the axis spans little, as the default one does.
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_scatter(
    ax: Any, link: Link, kpi: dict[int | float, float], ppl: dict[int | float, float]
) -> None:
    steps = [step for step in kpi if step in ppl]
    xs, ys = [ppl[s] for s in steps], [kpi[s] for s in steps]
    # A faint line in step order shows the path training took; the dots are the pairs.
    ax.plot(xs, ys, color="0.75", lw=0.8, zorder=1)
    ax.scatter(xs, ys, c=range(len(steps)), cmap="viridis", s=18, zorder=2)
    every = max(1, math.ceil(len(steps) / 20))  # about 20 labels at most stay readable
    for i, (step, x, y) in enumerate(zip(steps, xs, ys, strict=True)):
        if i % every == 0 or i == len(steps) - 1:
            ax.annotate(
                fmt_number(step), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7
            )
    if min(xs) > 0:
        ax.set_xscale("log")
        if min(xs) >= 1:
            _plain_log_ticks(ax.xaxis)
    rho = "n/a" if link.spearman is None else f"{link.spearman:+.2f}"
    ax.set_title(f"{link.kpi} vs {LINK_METRIC}\nSpearman {rho}, {link.points} points", fontsize=9)
    ax.set_xlabel(f"{LINK_METRIC} (labels: step)", fontsize=8)
    ax.set_ylabel(link.kpi, fontsize=8)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1  # the average of ranks start+1 .. end+1
        start = end + 1
    return ranks


def _by_step(run: RunData, key: str) -> dict[int | float, float]:
    """The last finite value of ``key`` at each step, in order of the steps' first appearance."""
    step_key = run.step_key()
    out: dict[int | float, float] = {}
    for row in run.history:
        value, step = row.get(key), row.get(step_key)
        if _is_number(value) and _is_number(step) and math.isfinite(value):
            out[step] = float(value)
    return out


def _kpi_keys(run: RunData, patterns: Iterable[str] | None) -> list[str]:
    """The KPI values worth linking or pricing: not bookkeeping, not running totals."""
    return [
        key
        for key in select_keys(run, patterns)
        if key_group(key) == "business" and _declared(run, key)[2] != "last"
    ]


def _target_step(run: RunData, kpi: str, keys: Sequence[str]) -> int | float | None:
    """The step the KPI first met its target, from the runner's ``<kpi>/reached_at_step``."""
    marker = f"{kpi}/reached_at_step"
    if marker not in keys:
        # A mapping KPI logs it beside its entries (kpi/<name>/reached_at_step) for its primary
        # entry, which the run does not record: only a mapping with one value is certain.
        parent = kpi.rsplit("/", 1)[0]
        entries = [k for k in _kpi_keys(run, None) if k.rsplit("/", 1)[0] == parent]
        marker = f"{parent}/reached_at_step"
        if parent == "kpi" or marker not in keys or entries != [kpi]:
            return None
    for row in run.history:
        value = row.get(marker)
        if _is_number(value) and math.isfinite(value):
            # Logged as a float; the step it names is a whole number.
            return int(value) if float(value).is_integer() else value
    return None


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


def _fmt_target(link: Link) -> str:
    if link.target_step is None:
        return "-"
    if link.perplexity_at_target is None:  # met at a step where the metric was not logged
        return f"- (met @ {fmt_number(link.target_step)})"
    return _fmt_point(Point(link.target_step, link.perplexity_at_target))


def _fmt_cost(item: CostOfImprovement) -> str:
    if item.cost_per_unit is None or item.unit is None:
        return f"n/a ({item.note})"
    sign = "+" if item.direction == "max" else "-"
    return (
        f"{fmt_number(item.cost_per_unit)} per {sign}{item.unit:g} "
        f"({_fmt_point(item.first)} -> {_fmt_point(item.best)}, "
        f"{fmt_number(item.spent)} spent)"
    )


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


def _plot_keys(run: RunData, patterns: Sequence[str] | None) -> list[str]:
    if patterns is not None:
        return select_keys(run, patterns)
    keys = select_keys(run)
    chosen = [
        k
        for k in keys
        if (key_group(k) == "model" and k.split("/")[1] in _HEADLINE_METRICS)
        or key_group(k) == "business"
    ]
    return chosen or keys  # a run with neither: draw what it has


def _panels(keys: Sequence[str]) -> list[tuple[str, list[tuple[str, str]], str]]:
    """``[(title, [(label, key), ...], group), ...]``: model panels first, headline ones first.

    ``train/x``, ``val/x``, ``test/x`` and the slices ``val/x/<slice>`` share the panel ``x``,
    labelled ``train``, ``val``, ``val/<slice>``.
    """
    panels: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key in keys:
        group = key_group(key)
        if group == "model" and key.count("/") >= 1:
            stage, name, *slice_ = key.split("/", 2)
            panels.setdefault((group, name), []).append(("/".join([stage, *slice_]), key))
        else:
            panels.setdefault((group, key), []).append((key, key))

    def order(item: tuple[tuple[str, str], Any]) -> tuple[int, int]:
        (group, title), _ = item
        headline = _HEADLINE_METRICS.index(title) if title in _HEADLINE_METRICS else 99
        return _GROUP_ORDER[group], headline if group == "model" else 0

    # sorted() is stable: panels of equal rank keep the table order of their keys.
    ranked = sorted(panels.items(), key=order)
    return [(title, members, group) for (group, title), members in ranked]
