"""What a run holds: its numeric keys, the group of each, and which way is best.

Bookkeeping keys are left out of a report unless asked for by name: W&B's own ``_step``,
``_runtime``, ``_timestamp`` (and any key starting with ``_``), ``trainer/global_step``,
``epoch``, and the KPI runner's ``*/seconds``, ``*/errors``, ``*/timeouts``, ``*/nonfinite``,
``*/table_errors`` and ``*/reached_at_step``. Tables and media are not numbers and never show.

Which way is best:

1. The run's own ``define_metric``, for the key or a glob that matches it: a ``summary`` of
   ``"min"`` or ``"max"`` (exactly one of the two), shown as ``(min)``/``(max)``; a ``summary``
   of ``"last"`` (a total or a counter such as ``kpi/cost/total`` or ``train/tokens``): no best
   value, shown as ``- (last)``; else a ``goal`` of ``"minimize"``/``"maximize"``.
2. Otherwise a guess from the words of the key (split at ``/``, ``_``, ``-``, ``.``); a
   lower-is-better word wins over a higher-is-better one (``kpi/error_rate`` is ``min``):

   - lower is better: ``loss``, ``cross_entropy``, ``nll``, ``perplexity``, ``ppl``,
     ``entropy`` (lower = more confident), ``error``, ``fail``/``failure``, ``cost``, ``price``,
     ``usd``, ``seconds``, ``latency``, ``duration``, ``time_to``, ``wall``;
   - higher is better: ``accuracy``, ``acc``, ``rate``, ``speedup``, ``score``, ``tokens``,
     ``throughput``, ``per_sec``/``per_second``, ``pass``, ``success``, ``reward``, ``f1``,
     ``bleu``, ``rouge``, ``precision``, ``recall``, ``auc``.

   Shown as ``(min?)``/``(max?)``. A key that matches neither list gets no best value.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from lossplug.loggers.run_reader import RunData, is_number
from lossplug.loggers.wandb import KPI_CONFIG_KEY
from lossplug.monitoring.keys import BOOKKEEPING

MODEL_PREFIXES = ("train/", "val/", "test/")
BUSINESS_PREFIXES = ("kpi/",)
GROUP_TITLES = {"model": "model metrics", "business": "business KPIs", "other": "other"}
GROUP_ORDER = {"model": 0, "business": 1, "other": 2}
_BOOKKEEPING_KEYS = frozenset({"trainer/global_step", "epoch"})
WORD_START = r"(?:^|(?<=[/_.\-\s]))"
WORD_END = r"(?=$|[/_.\-\s])"
_LOWER_IS_BETTER = re.compile(
    WORD_START
    + r"(?:loss(?:es)?|cross_entropy|nll|perplexity|ppl|entropy|errors?|err|fail(?:ures?|ed)?"
    r"|costs?|price|usd|seconds|latency|duration|time_to|wall)" + WORD_END
)
_HIGHER_IS_BETTER = re.compile(
    WORD_START + r"(?:accuracy|acc|rates?|speedups?|scores?|tokens?|throughput|per_sec(?:ond)?"
    r"|pass(?:ed)?|success(?:es)?|rewards?|f1|bleu|rouge\w*|precision|recall|auc)" + WORD_END
)
# Words of a KPI key that measure the run's machinery (speed, cost, time), not the model.
_MACHINERY = re.compile(
    WORD_START + r"(?:throughput|per_sec(?:ond)?|costs?|price|usd|dollars?|spend|spent|bill"
    r"|seconds(?:_to_target)?|time_to\w*|wall|runtime)" + WORD_END
)


def is_bookkeeping(key: str) -> bool:
    """Whether ``key`` is bookkeeping rather than a metric (see the module docs).

    Example:
        >>> [is_bookkeeping(k) for k in ("kpi/pass_rate", "kpi/pass_rate/seconds", "_runtime")]
        [False, True, True]
    """
    if key.startswith("_") or key in _BOOKKEEPING_KEYS:
        return True
    # the KPI runner's keys beside each KPI: how long it took and how it failed, not its value
    return "/" in key and key.rsplit("/", 1)[1] in BOOKKEEPING


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
    direction, source, _ = declared_direction(run, key)
    return direction, source


def declared_direction(run: RunData, key: str) -> tuple[str | None, str | None, str | None]:
    """``(direction, source, summary)``; summary is ``"last"`` for a total or counter.

    A ``<key>_epoch`` value (Lightning's epoch mean) whose own definitions say no direction
    takes the direction defined for ``<key>``.
    """
    definitions = _definitions(run, key)
    if key.endswith("_epoch"):
        definitions += _definitions(run, key.removesuffix("_epoch"))
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


def kpi_description(run: RunData, key: str) -> dict[str, Any] | None:
    """What the run's config says of the KPI that logged ``key``, ``None`` when it says nothing.

    The callbacks write each KPI's ``describe()`` (target, direction, outcome, unit) under
    ``lossplug_kpis``; ``key`` is the KPI's own key or one of its entries (``kpi/<name>/<sub>``).

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("r.wandb"), config={"lossplug_kpis": {"kpi/p": {"unit": "%"}}})
        >>> kpi_description(run, "kpi/p/python"), kpi_description(run, "kpi/other")
        ({'unit': '%'}, None)
    """
    found = _described(run, key)
    return None if found is None else found[1]


def kpi_target(run: RunData, key: str) -> float | None:
    """The target the run recorded for ``key``: its KPI's, for the KPI's own value, or for the
    entry of a mapping KPI that is its ``primary``.

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("r.wandb"), config={"lossplug_kpis": {
        ...     "kpi/pass": {"target": 0.8, "primary": "python"}}})
        >>> kpi_target(run, "kpi/pass/python"), kpi_target(run, "kpi/pass/rust")
        (0.8, None)
    """
    found = _described(run, key)
    if found is None or not is_number(found[1].get("target")):
        return None
    owner, description = found
    if key == owner or key[len(owner) + 1 :] == description.get("primary"):
        return float(description["target"])
    return None


def kpi_unit(run: RunData, key: str) -> str | None:
    """The unit the run recorded for ``key``'s KPI (``TrainingCost(currency="USD")``)."""
    unit = (kpi_description(run, key) or {}).get("unit")
    return unit if isinstance(unit, str) and unit else None


def _described(run: RunData, key: str) -> tuple[str, dict[str, Any]] | None:
    """``(KPI key, description)`` of the KPI that logged ``key``; the longest name owns it."""
    described = run.config.get(KPI_CONFIG_KEY)
    if not isinstance(described, dict):
        return None
    owners = [k for k in described if key == k or key.startswith(k + "/")]
    if not owners:
        return None
    owner = max(owners, key=len)
    entry = described[owner]
    return (owner, entry) if isinstance(entry, dict) else None


def measures_the_run(run: RunData, key: str) -> str | None:
    """Why KPI ``key`` measures the run's machinery rather than the model, ``None`` when it does
    not: its KPI was declared ``outcome=False``, or (for a run that does not say) its name is
    about speed, cost or time (``throughput``, ``per_sec``, ``cost``, ``seconds``, ``time_to``).

    Example:
        >>> from pathlib import Path
        >>> run = RunData(path=Path("r.wandb"))
        >>> [measures_the_run(run, k) for k in ("kpi/throughput/tokens_per_sec", "kpi/pass")]
        ['its name is about speed, cost or time', None]
    """
    if is_bookkeeping(key):
        return "bookkeeping"
    description = kpi_description(run, key)
    if description is not None and "outcome" in description:
        return None if description["outcome"] else "declared outcome=False"
    if _MACHINERY.search(key.lower()):
        return "its name is about speed, cost or time"
    return None


def _definitions(run: RunData, key: str) -> list[Any]:
    definitions = [run.metrics[key]] if key in run.metrics else []
    # An exact definition comes first; globs ("kpi/*") after, in the order they were defined.
    definitions += [d for d in run.metrics.values() if d.glob and fnmatch.fnmatchcase(key, d.name)]
    return definitions


def numeric_keys(run: RunData) -> list[str]:
    """Every history key with at least one numeric value, bookkeeping included, in table order."""
    # one pass over the rows for every key at once, where a pass per key walks them all each time
    found: dict[str, None] = {}
    for row in run.history:
        for key, value in row.items():
            if key not in found and is_number(value):
                found[key] = None
    # By name within a group and stage: the same order whatever order the rows were logged in,
    # and a KPI's own sub-keys (kpi/x/...) right after it.
    return sorted(found, key=lambda k: (GROUP_ORDER[key_group(k)], _prefix_rank(k), k))


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
    return [key for key in keys if matches(key, wanted, names_only=is_bookkeeping(key))]


def kpi_keys(run: RunData, patterns: Iterable[str] | None) -> list[str]:
    """The KPI values worth linking or pricing: not bookkeeping, not running totals."""
    return [
        key
        for key in select_keys(run, patterns)
        if key_group(key) == "business" and declared_direction(run, key)[2] != "last"
    ]


def values_by_step(run: RunData, key: str) -> dict[int | float, float]:
    """The last finite value of ``key`` at each step, in order of the steps' first appearance."""
    out: dict[int | float, float] = {}
    for step, value in run.series(key):
        if is_number(value) and is_number(step) and math.isfinite(value):
            out[step] = float(value)
    return out


def matches(key: str, patterns: Sequence[str], *, names_only: bool = False) -> bool:
    """Whether ``key`` matches one of ``patterns`` as :func:`select_keys` reads them."""
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
