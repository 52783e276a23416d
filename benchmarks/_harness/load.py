"""Load from other processes: how much of the CPU they used during a timing, the policy that
waits for a quiet machine and redoes a busy timing (:func:`quietest`), the load average, and
busy-looping processes for the contention runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

QUIET_TIMEOUT_S = 120.0  # longest wait for a quiet machine before a timing (--max-background)


def _cpu_sample() -> tuple[float, float, float]:
    """(all cores' busy seconds, all cores' total seconds, this process's CPU seconds)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0, own.ru_utime + own.ru_stime
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait; steal counts as busy (someone else ran)
    return (sum(ticks) - idle) / hz, sum(ticks) / hz, own.ru_utime + own.ru_stime


@contextlib.contextmanager
def background_meter() -> Iterator[dict[str, float | None]]:
    """``with background_meter() as load:`` sets ``load["share"]`` on leaving the block: the
    share of all cores that other processes kept busy meanwhile (None where unknown)."""
    load: dict[str, float | None] = {"share": None}
    before = _cpu_sample()
    yield load
    busy, total, own = (a - b for a, b in zip(_cpu_sample(), before, strict=True))
    load["share"] = max(0.0, busy - own) / total if total > 0 else None


def wait_for_quiet(max_share: float, timeout_s: float, window_s: float = 3.0) -> bool:
    """Wait (at most ``timeout_s``) until other processes use under ``max_share`` of the cores
    for ``window_s`` seconds; whether that happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with background_meter() as load:
            time.sleep(window_s)
        if load["share"] is None or load["share"] < max_share:
            return True
    return False


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """``--max-background`` and ``--retries``: what to do when other processes load the CPU."""
    parser.add_argument(
        "--max-background",
        type=float,
        metavar="PCT",
        help="redo a group's timing (after waiting up to 120 s for a quiet 3 s window) while "
        "other processes used more than PCT%% of all cores during it; default 10, "
        "100 with --quick (never redo)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="timing re-runs per group at most (default 2)"
    )


def load_policy(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`quietest`'s policy from the options of :func:`add_load_options`."""
    pct_max = args.max_background
    if pct_max is None:
        pct_max = 100.0 if args.quick else 10.0
    if pct_max >= 100:
        return {"max_background": None, "retries": 0}
    return {"max_background": pct_max / 100, "retries": max(0, args.retries)}


def describe_policy(policy: dict[str, Any]) -> str:
    if policy["max_background"] is None:
        return "timed once whatever the load"
    return (
        f"a group's timing is redone (up to {policy['retries']} times, each after waiting up to "
        f"{QUIET_TIMEOUT_S:.0f} s for a quiet 3 s window) while other processes used more than "
        f"{100 * policy['max_background']:.0f}% of all cores during it; the quietest is kept"
    )


def quietest(
    measure: Callable[[], dict[str, Any]], policy: dict[str, Any]
) -> tuple[dict[str, Any], list[float | None]]:
    """``measure()`` under the load ``policy`` of :func:`load_policy`: once, or after waiting
    for a quiet machine and redone while other processes used more than ``max_background`` of
    the cores (``measure`` reports that share as ``"background_cpu"``). Returns the quietest
    attempt and every attempt's share."""
    limit = policy["max_background"]
    best: dict[str, Any] | None = None
    shares: list[float | None] = []
    for _ in range(1 + policy["retries"] if limit is not None else 1):
        if limit is not None:
            wait_for_quiet(limit, QUIET_TIMEOUT_S)
        attempt = measure()
        share = attempt.get("background_cpu")
        shares.append(share)
        least = None if best is None else best.get("background_cpu")
        if best is None or (share is not None and least is not None and share < least):
            best = attempt
        if limit is None or share is None or share <= limit:
            break
    assert best is not None
    return best, shares


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


_BUSY_LOOP = "import os, time\nppid = os.getppid()\nwhile os.getppid() == ppid:\n    pass\n"


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` processes that busy-loop until the block is left (or this process dies: each
    loop ends when its parent changes), stopped on any exit including Ctrl-C."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]))
        time.sleep(0.5 if count else 0.0)  # let them reach the scheduler's steady state
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
