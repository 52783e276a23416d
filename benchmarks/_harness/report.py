"""The report: header and footer, table cells and Markdown tables, the verdicts a target is
judged with, the legend under a table, the contention table and the ``--json`` payload."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from .cases import Result
from .inputs import MiB
from .load import loadavg

# ----------------------------------------------------------------------------------------------
# verdicts: the two words a report judges a target with


def verdict(value: float | None, limit: float, digits: int = 2) -> str:
    """``met`` / ``at the limit`` / ``**missed**`` for the target ``value ≤ limit`` (``n/a``
    without a value), judged at the precision the table shows (``digits`` after the point):
    a ratio printed as 1.00x against a 1.0x limit is neither a win nor a loss, and meets it."""
    if value is None:
        return "n/a"
    shown = round(value, digits)
    if shown < limit:
        return "met"
    return "at the limit" if shown == limit else "**missed**"


def pass_fail(ok: bool | None) -> str:
    """The first word of a line of the GPU suite's target list: ``PASS``, ``FAIL`` or ``N/A``
    (padded to the same width, so the labels after it line up)."""
    return "N/A " if ok is None else "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------------------
# header, footer, table cells and tables


def version_of(distribution: str) -> str:
    """The installed version of ``distribution``, or ``not installed``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(**extra: str) -> dict[str, str]:
    """CPU model, core count, memory, library versions, the date, and ``extra`` (shown by
    :func:`header` on a line of its own)."""
    import lossplug

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = _meminfo_gib()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{mem:.1f} GiB" if mem else "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchmetrics": version_of("torchmetrics"),
        "lossplug": lossplug.__version__,
        "lossplug_source": lossplug_source(lossplug.__file__),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **extra,
    }


_INFO_KEYS = ("cpu", "cores", "memory", "python", "torch", "torchmetrics", "lossplug")


def lossplug_source(init_file: str) -> str:
    """Which lossplug code is measured: its folder and the git commit of the checkout it is in,
    with a warning when that folder has uncommitted changes (numbers must be tied to code)."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))

    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", folder, *cmd], capture_output=True, text=True, timeout=20, check=False
        )

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit.returncode != 0:
            return f"{folder} (not a git checkout)"
        dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return folder
    state = ", with uncommitted changes" if dirty else ""
    return f"{folder} (git {commit.stdout.strip()}{state})"


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def header(title: str, info: dict[str, str], threads: int, method: str) -> str:
    """The report's title and the machine, versions, date, command and method lines."""
    skip = (*_INFO_KEYS, "lossplug_source", "date")
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k not in skip)
    return (
        f"# {title}\n\n"
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
        f"torch threads {threads}\n"
        f"- python {info['python']}, torch {info['torch']}, "
        f"torchmetrics {info['torchmetrics']}, lossplug {info['lossplug']}\n"
        + (f"- {extra}\n" if extra else "")
        + f"- lossplug source: {info.get('lossplug_source', 'n/a')}\n"
        f"- date: {info['date']}\n"
        f"- command: python {shlex.join(sys.argv)}\n"
        f"- {method}"
    )


def footer(results: Sequence[Result], load_before: str, seconds: float) -> str:
    """Load, memory method and wall time of the run."""
    methods = sorted({r.memory_method for r in results if r.memory_method})
    return (
        f"\n- load average before: {load_before}; after: {loadavg()}\n"
        f"- peak memory method: {', '.join(methods) or 'n/a'}\n"
        f"- total wall time: {seconds:.0f} s"
    )


def progress_line(res: Result, label: str, status: str = "") -> str:
    """One line per measured case while the run goes on (``status``: what to say of it)."""
    if not status:
        status = (
            f"{fmt(res.median_s, '.3f')} s, +{mib(res.extra_bytes or 0)} MiB, ppl rel err "
            f"{fmt(res.ppl_rel_err, '.1e')}, background CPU {pct(res.background_cpu)}"
        )
    status = res.error or status
    if res.timing_attempts > 1:
        status += f" (timing attempts: {res.timing_attempts})"
    return f"  {label} {status}"


def pct(share: float | None) -> str:
    """A share as a whole percentage, for a table cell."""
    return fmt(None if share is None else 100 * share, ".0f") + "%"


def fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def anchor_ratios(
    ours: Result | None,
    res: Result,
    time_of: Callable[[Result], float | None] = lambda r: r.median_s,
) -> list[str]:
    """The two ratio cells of an anchor's row, lossplug ÷ anchor in time and in extra memory
    (dashes on lossplug's own row, or where lossplug failed)."""
    if ours is None or ours is res or ours.error:
        return ["—", "—"]
    return [ratio(time_of(ours), time_of(res)), ratio(ours.extra_bytes, res.extra_bytes)]


def ms(res: Result) -> str:
    """Median time of ``res`` in milliseconds, for a table cell."""
    return fmt(None if res.median_s is None else res.median_s * 1e3, ".1f")


def mib(nbytes: int | None) -> str:
    return fmt(None if nbytes is None else nbytes / MiB, ".0f")


def legend(anchor: str, *columns: str) -> str:
    """The note under a report that says what its ratios and ``columns`` mean."""
    ratios = f"ratios are lossplug ÷ {anchor} (below 1 = lossplug faster / leaner)"
    load = "bg CPU = share of all cores used by other processes while the group was timed"
    return "- " + "; ".join([ratios, *columns, load])


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table; a short row (an error) is padded with empty cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = list(row) + [""] * (len(head) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(path: str, payload: dict[str, Any]) -> None:
    """``payload`` and the command line, as JSON."""
    with open(path, "w") as fh:
        json.dump({**payload, "argv": sys.argv}, fh, indent=1)


def results_json(info: dict[str, str], results: Sequence[Result]) -> dict[str, Any]:
    """The raw results of a CPU benchmark, with the derived median and perplexity error."""
    rows = [{**asdict(r), "median_s": r.median_s, "ppl_rel_err": r.ppl_rel_err} for r in results]
    return {"machine": info, "results": rows}


def contention_table(label: str, ratios: dict[tuple[str, str, int], dict[str, Any]]) -> list[str]:
    """Markdown rows: one per (lossplug impl, anchor, busy count) of :func:`contention_ratios`."""
    rows = []
    for (ours, anchor, n_busy), row in ratios.items():
        ours_ms, anchor_ms = statistics.median(row["ours_ms"]), statistics.median(row["anchor_ms"])
        rows.append(
            [
                label,
                f"{ours} ÷ {anchor}",
                str(n_busy),
                f"{ours_ms:.0f} / {anchor_ms:.0f}",
                f"{max(row['ratios']):.2f}x",
                f"{statistics.median(row['ratios']):.2f}x",
                ", ".join(row["load"]),
            ]
        )
    return rows


CONTENTION_HEAD = (
    "group",
    "pair",
    "busy procs",
    "median ms (ours / anchor)",
    "worst ratio",
    "median ratio",
    "load (1 min) per round",
)
