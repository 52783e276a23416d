"""What the GPU suite judges with: the DESIGN.md targets and the tolerances of the correctness
checks, the records of a check (:class:`Check`) and of a timing (:class:`Timing`), the loss and
``TokenStats`` comparison against float64, the checks table, and the PASS/FAIL line per target
that ends the report (:func:`target_lines`); and the block size the suite's inputs are built in."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import _harness as H
import torch
from _harness import MiB

# DESIGN.md targets, as multiples of the floor
TARGET_FWD_BWD = 1.3
TARGET_STATS = 1.2
TARGET_LCE_FLOOR = 1.4  # linear cross-entropy, against its FLOP floor
BLOCK_BYTES = 256 * MiB  # inputs are built this much float32 at a time
STAT_FIELDS = ("nll_sum", "tokens", "correct", "entropy_sum", "lse_sq_sum")  # TokenStats sums
# relative tolerances of the statistics; perplexity's 1e-4 is the DESIGN.md rule, the sums can do
# better (a near-tie may flip an argmax of the linear op, whose logits are rounded differently)
STAT_TOLERANCES = {
    "loss": 1e-5,
    "nll_sum": 1e-5,
    "tokens": 0.0,
    "correct": 0.0,
    "entropy_sum": 1e-4,
    "lse_sq_sum": 1e-5,
    "perplexity": 1e-4,
}


@dataclass
class Check:
    """One correctness comparison against the float64 reference."""

    case: str
    quantity: str
    value: float
    reference: float
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class Timing:
    """One (implementation, mode) measurement."""

    impl: str
    mode: str  # "fwd", "fwd+bwd" or "stats"
    times_ms: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    floor_ms: float = 0.0
    note: str = ""
    section: str = "cross_entropy"  # or "linear_cross_entropy"

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def x_floor(self) -> float | None:
        """The median time as a multiple of the floor."""
        return None if self.median_ms is None else self.median_ms / self.floor_ms


def stat_checks(
    name: str, loss: torch.Tensor, stats: Any, ref: dict[str, float], tol: dict[str, float]
) -> list[Check]:
    """The loss, every ``TokenStats`` sum and the perplexity against the float64 ``ref``."""
    got = {"loss": float(loss.detach())}
    got.update({key: float(getattr(stats, key)) for key in STAT_FIELDS})
    got["perplexity"] = float(stats.perplexity)
    ref = {**ref, "perplexity": float(torch.tensor(ref["loss"]).double().exp())}
    return [Check(name, k, v, ref[k], H.rel_err(v, ref[k]) or 0.0, tol[k]) for k, v in got.items()]


def na_note(exc: BaseException) -> str:
    """Why a row has no number: the exception's type and last line, fit for a table cell."""
    text = str(exc).strip()
    last = text.splitlines()[-1].replace("|", "/") if text else ""
    return f"n/a ({type(exc).__name__}: {last[:100]})"


def yes_no(ok: bool) -> str:
    """A target cell's answer (the PASS/FAIL lines are :func:`target_lines`)."""
    return "yes" if ok else "NO"


def format_checks(checks: list[Check]) -> str:
    head = ["case", "quantity", "lossplug", "float64 ref", "rel err", "tol", "ok"]
    rows = []
    for c in checks:
        cells = [c.case, c.quantity, f"{c.value:.9g}", f"{c.reference:.9g}", f"{c.error:.2e}"]
        rows.append([*cells, f"{c.tolerance:.0e}", "PASS" if c.ok else "FAIL"])
    return "\n".join(H.markdown_table(head, rows))


def target_lines(
    checks: list[Check], lce_checks: list[Check], timings: list[Timing], tiny: bool
) -> list[str]:
    """One ``PASS``/``FAIL``/``N/A``/``SKIP`` line per target, with the number behind it."""
    lines = []
    skip = " (--tiny: CPU wall clock)"  # GPU floors say nothing of CPU times

    def add(label: str, ok: bool | None, detail: str) -> None:
        """``detail``: ``": the number"``, or ``" (why there is none)"``."""
        lines.append(f"{'SKIP' if detail == skip else H.pass_fail(ok)}  {label}{detail}")

    for name, group in (("cross-entropy", checks), ("linear cross-entropy", lce_checks)):
        if group:
            good = sum(c.ok for c in group)
            add(f"correctness {name}", good == len(group), f": {good}/{len(group)} checks")

    def find(impl: str, mode: str = "fwd+bwd") -> Timing | None:
        return next((t for t in timings if t.impl == impl and t.mode == mode), None)

    def timed(label: str, t: Timing | None, limit: float) -> None:
        if t is None:
            return
        if tiny:
            add(label, None, skip)
        elif t.x_floor is None:
            add(label, None, f" ({t.note or 'not run'})")
        else:
            add(label, t.x_floor <= limit, f": {t.x_floor:.2f}x floor")

    timed(f"CE fwd+bwd <= {TARGET_FWD_BWD}x floor", find("lossplug-triton"), TARGET_FWD_BWD)
    timed(f"CE stats <= {TARGET_STATS}x floor", find("lossplug-triton", "stats"), TARGET_STATS)
    ours, liger = find("lossplug-triton"), find("liger CrossEntropyLoss")
    if ours is not None and liger is not None:
        label = "CE fwd+bwd faster than Liger CE"
        if tiny:
            add(label, None, skip)
        elif ours.median_ms is None or liger.median_ms is None:
            add(label, None, f" ({(liger.note or ours.note) or 'not run'})")
        else:
            faster = ours.median_ms < liger.median_ms
            add(label, faster, f": {ours.median_ms:.3f} vs {liger.median_ms:.3f} ms")
    cce = find("CCE linear_cross_entropy (cce)")
    for impl in ("lossplug (torch backend)", "lossplug (triton)"):
        t = find(impl)
        timed(f"linear CE fwd+bwd {impl} <= {TARGET_LCE_FLOOR}x floor", t, TARGET_LCE_FLOOR)
        if t is None or tiny:
            continue
        label = f"linear CE peak extra memory {impl} <= CCE's"
        if t.peak_extra_bytes is None or cce is None or cce.peak_extra_bytes is None:
            add(label, None, f" ({cce.note if cce is not None else 'CCE not run'})")
        else:
            ok = t.peak_extra_bytes <= cce.peak_extra_bytes
            add(label, ok, f": {H.mib(t.peak_extra_bytes)} vs {H.mib(cce.peak_extra_bytes)} MiB")
    return lines
