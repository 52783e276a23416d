"""Model ↔ business: how each KPI moved with perplexity over a run.

- **Pairing:** a KPI value pairs with the metric's value logged at the *same step* (KPIs run
  after validation at the same global step, in a row of their own). When a key is logged more
  than once at a step, its last finite value there counts. Steps where either has no finite
  value are left out; nothing is interpolated.
- **Which KPIs:** every outcome ``kpi/`` key (see :func:`linked_kpis`) that is not
  bookkeeping and not a running total (``define_metric`` ``summary="last"``, such as
  ``kpi/cost/total``: a total only grows with the step, so its correlation says nothing) with
  at least :data:`MIN_LINK_POINTS` points paired with ``val/perplexity``. A per-slice link is
  shown when it has that many pairs too. KPIs that measure the run's machinery (throughput,
  cost, time to a target) are left out unless asked for (``link=``): how fast or how dear a
  run went does not depend on the model's perplexity, and their correlation with it changes
  with how busy the machine was.
- **Spearman:** the Pearson correlation of the ranks, ties given their average rank; exactly
  ``1.0`` or ``-1.0`` for a strictly monotone relation, ``None`` (``n/a``) when either series is
  constant.
- **Perplexity at target:** a KPI with a ``target`` logs ``kpi/<name>/reached_at_step`` once,
  when it first meets it; the link gives the metric's value logged at that step. A mapping KPI's
  target follows its ``primary`` entry, which the run does not record: it is given to an entry
  only when that entry is the mapping's only value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lossplug.loggers.run_reader import RunData
from lossplug.report.keys import (
    is_bookkeeping,
    is_number,
    kpi_keys,
    matches,
    measures_the_run,
    numeric_keys,
    values_by_step,
)

# The model metric every KPI is linked to, and the prefix of its per-slice versions.
LINK_METRIC = "val/perplexity"
# Fewer pairs give a rank correlation of +-1 or 0 by construction, which says nothing.
MIN_LINK_POINTS = 3


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


def linked_kpis(
    run: RunData, keys: Iterable[str] | None = None, link: Iterable[str] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """The KPIs to link with perplexity (or to price), and those left out with the reason.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the KPIs, as in :func:`~lossplug.report.select_keys`.
        link: Keys or glob patterns of KPIs to link even though they measure the run.

    Returns:
        ``(linked, left_out)``: KPI keys in table order, and ``(key, reason)`` pairs.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "kpi/pass_rate": 0.5, "kpi/throughput/tokens_per_sec": 900.0}])
        >>> linked_kpis(run)
        (['kpi/pass_rate'], [('kpi/throughput/tokens_per_sec', 'its name is about speed, cost or time')])
        >>> linked_kpis(run, link=["kpi/throughput/*"])[1]
        []
    """  # noqa: E501
    asked = list(link)
    linked, left_out = [], []
    for key in kpi_keys(run, keys):
        reason = measures_the_run(run, key)
        if reason is None or matches(key, asked):
            linked.append(key)
        else:
            left_out.append((key, reason))
    return linked, left_out


def link_kpis(
    run: RunData, keys: Iterable[str] | None = None, *, link: Iterable[str] = ()
) -> list[Link]:
    """Each KPI's Spearman correlation with ``val/perplexity`` and each per-slice perplexity.

    See the module docs for the pairing rule and which KPIs are linked.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Glob patterns choosing the KPIs, as in :func:`~lossplug.report.select_keys`;
            ``None`` for all.
        link: KPIs to link even though they measure the run (see :func:`linked_kpis`).

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
    values = {key: values_by_step(run, key) for key in metrics}
    links = []
    for kpi in linked_kpis(run, keys, link)[0]:
        kpi_values = values_by_step(run, kpi)
        reached = target_step(run, kpi, all_keys)
        for metric in metrics:
            steps = [s for s in kpi_values if s in values[metric]]
            if len(steps) < MIN_LINK_POINTS:
                if metric == LINK_METRIC:
                    break  # not a KPI logged at validation steps: no link at all
                continue
            at_target = None if reached is None else values[metric].get(reached)
            links.append(
                Link(
                    kpi=kpi,
                    metric=metric,
                    spearman=spearman(
                        [kpi_values[s] for s in steps], [values[metric][s] for s in steps]
                    ),
                    points=len(steps),
                    target_step=reached,
                    perplexity_at_target=at_target,
                )
            )
    return links


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


def target_step(run: RunData, kpi: str, keys: Sequence[str] | None = None) -> int | float | None:
    """The step the KPI first met its target, from the runner's ``<kpi>/reached_at_step``.

    ``keys`` is :func:`~lossplug.report.numeric_keys` of the run when the caller has it.
    """
    keys = numeric_keys(run) if keys is None else keys
    marker = f"{kpi}/reached_at_step"
    if marker not in keys:
        # A mapping KPI logs it beside its entries (kpi/<name>/reached_at_step) for its primary
        # entry, which the run does not record: only a mapping with one value is certain.
        parent = kpi.rsplit("/", 1)[0]
        marker = f"{parent}/reached_at_step"
        if parent == "kpi" or marker not in keys:
            return None
        if [k for k in kpi_keys(run, None) if k.rsplit("/", 1)[0] == parent] != [kpi]:
            return None
    for _, value in run.values(marker):
        if is_number(value) and math.isfinite(value):
            # Logged as a float; the step it names is a whole number.
            return int(value) if float(value).is_integer() else value
    return None
