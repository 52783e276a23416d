"""The names of what the monitors log, and how W&B summarises each of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The model-centric values a monitor can log, by name.
METRIC_NAMES = ("cross_entropy", "perplexity", "token_accuracy", "entropy")
#: W&B summary of each logged value: its best, or the last one for the running token total.
SUMMARIES = {"cross_entropy": "min", "perplexity": "min", "token_accuracy": "max", "tokens": "last"}
#: The last part of the keys that count a KPI's cost and health rather than its value.
BOOKKEEPING = ("seconds", "errors", "timeouts", "nonfinite", "table_errors", "reached_at_step")
STAGES = ("train", "val")


def is_bookkeeping(key: str) -> bool:
    """Whether ``key`` is a KPI's cost or health counter (``kpi/<name>/errors``…)."""
    return key.rsplit("/", 1)[-1] in BOOKKEEPING


def check_metric_names(metrics: Any) -> tuple[str, ...]:
    """``metrics`` as a tuple of names from :data:`METRIC_NAMES`, or an error that names it.

    Example:
        >>> check_metric_names(["perplexity"])
        ('perplexity',)
    """
    if isinstance(metrics, str) or not isinstance(metrics, Sequence):
        raise TypeError(f"metrics must be a sequence of names from {METRIC_NAMES}, got {metrics!r}")
    names = tuple(metrics)
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"metrics must be a non-empty subset of {METRIC_NAMES} without repeats, got {metrics!r}"
        )
    return names


def metric_summary(key: str, prefixes: Sequence[str]) -> str | None:
    """W&B's summary of a model-centric key under one of ``prefixes`` (``"train/"``…).

    A slice's key (``val/perplexity/code``) and an epoch's (``train/perplexity_epoch``) take the
    summary of their base key.

    Example:
        >>> metric_summary("val/perplexity/code", ["train/", "val/"])
        'min'
        >>> metric_summary("train/token_accuracy_epoch", ["train/", "val/"])
        'max'
    """
    for prefix in prefixes:
        if key.startswith(prefix):
            name = key[len(prefix) :].split("/", 1)[0]
            return SUMMARIES.get(name.removesuffix("_epoch"))
    return None


def kpi_summary(key: str, kpis: Sequence[Any]) -> str | None:
    """W&B's summary of a key a KPI logs: its best (``max``/``min`` by the KPI's direction), the
    last value for running totals, W&B's default for cost and health counters.

    Example:
        >>> from lossplug.kpi import KPI
        >>> kpi_summary("kpi/cost/total", [KPI("cost", len, cumulative=("total",))])
        'last'
    """
    for item in kpis:
        if key == item.key or key.startswith(item.key + "/"):
            if is_bookkeeping(key):
                return None
            # a running total's best is its first or last value: only the last one means much
            if item.is_cumulative(key):
                return "last"
            return "max" if item.higher_is_better else "min"
    return None
