"""What is measured and what comes back: :class:`Case`, :class:`Group`, :class:`Result`."""

from __future__ import annotations

import dataclasses
import statistics
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class Case:
    """One measured configuration: what a child process needs to build its inputs and call.

    A script adds its own fields in a subclass; a :class:`Group` holds one with ``impl`` unset.
    """

    impl: str = ""
    shape: tuple[int, ...]
    dtype: str  # key of DTYPES
    threads: int
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass(frozen=True)
class Group:
    """The cases timed together, on the same inputs, their calls interleaved."""

    label: str  # what ``--only`` matches and the tables show
    setup: Any  # the script's :class:`Case`, everything but ``impl``
    impls: tuple[str, ...]
    repeats: int
    untimed: tuple[str, ...] = ()  # measured by their cold call only (too slow to repeat)

    def case(self, impl: str) -> Any:
        return dataclasses.replace(self.setup, impl=impl)

    @property
    def timed(self) -> tuple[str, ...]:
        return tuple(impl for impl in self.impls if impl not in self.untimed)


@dataclass
class Result:
    """What the child processes measured for one case (``case`` is the script's own type)."""

    case: Any
    times_s: list[float] = field(default_factory=list)
    background_cpu: float | None = None  # share of all cores used by other processes
    extra_bytes: int | None = None
    memory_method: str = ""
    ppl: float | None = None
    ppl_ref: float | None = None
    error: str | None = None
    timing_attempts: int = 0  # timed runs made (more than one when the machine was busy)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def ppl_rel_err(self) -> float | None:
        return rel_err(self.ppl, self.ppl_ref)


def rel_err(value: float | None, reference: float | None) -> float | None:
    """``|value - reference| / |reference|`` (0 when equal; None when either is missing)."""
    if value is None or reference is None:
        return None
    if value == reference:
        return 0.0
    return abs(value - reference) / max(abs(reference), 1e-30)


def last_error_line() -> str:
    """The last line of the current exception's traceback (for a table cell)."""
    return traceback.format_exc(limit=3).strip().splitlines()[-1]
