"""What the CPU benchmarks share: child processes, peak memory, interleaved timing, reporting.

Each case's peak extra memory comes from one cold call in a child process of its own, so memory
an earlier case left mapped cannot hide it. Times are the median of repeated calls made
round-robin (the implementation under test and its anchors interleaved) in one child process per
group, so load from other processes hits all of them alike; that load is measured too.

Children are forked from a forkserver that has only imported the modules named in ``preload``:
starting a case costs milliseconds instead of a fresh interpreter, and no thread pool exists yet
in the server (forking after OpenMP has started its threads can hang the child).

Used by ``cross_entropy.py``, ``metrics.py`` and ``linear_cross_entropy.py`` in this folder (run as
``python benchmarks/X.py``, which puts this folder on ``sys.path``): each describes itself in a
:class:`BenchmarkSpec` (its cases, anchors and tables) and :func:`run_benchmark` does the rest
(options, groups, child processes, ``--busy`` contention, report, ``--json``). The float64
references are the tests' own, ``tests/_reference.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

# the float64 references live with the tests (tests/_reference.py); the benchmarks import them
_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

import _reference  # noqa: E402

IGNORE = _reference.IGNORE
MiB = _reference.MiB


# ----------------------------------------------------------------------------------------------
# results


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
        if self.ppl is None or self.ppl_ref is None:
            return None
        return abs(self.ppl - self.ppl_ref) / self.ppl_ref


class GroupLike(Protocol):
    """A set of cases timed together on the same inputs."""

    impls: tuple[str, ...]

    def case(self, impl: str) -> Any: ...


def last_error_line() -> str:
    """The last line of the current exception's traceback (for a table cell)."""
    return traceback.format_exc(limit=3).strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# memory probes (Linux)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    # allow for pages touched between the two reads
    return hwm is not None and rss is not None and hwm - rss < 1024


def _malloc_trim() -> None:
    """Give free heap pages back to the OS (glibc), so that freed memory still resident cannot
    serve an allocation of the measured call without showing in its peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class PeakProbe:
    """Peak resident memory above the moment :meth:`start` was called, in bytes.

    The baseline is taken after a garbage collection and ``malloc_trim``: building the inputs a
    few rows at a time leaves freed chunks of the heap resident (glibc raises its mmap threshold
    after the first large free), and a call whose workspaces fit in them would look free.
    """

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.reset = _reset_peak()
        if self.reset:
            self.method = "VmHWM reset via /proc/self/clear_refs"
            self.base_kib = _status_kib("VmRSS") or 0
        else:
            # ru_maxrss is a high-water mark since process start; inputs are built in small
            # chunks so that it equals the resident size at this point.
            self.method = "ru_maxrss difference"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def extra_bytes(self) -> int:
        if self.reset:
            peak = _status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base_kib) * 1024


def cold_call(call: Callable[[], Any], result: Result) -> Any:
    """Run ``call`` once under a :class:`PeakProbe`; store its peak extra memory in ``result``."""
    probe = PeakProbe()
    probe.start()
    out = call()
    result.extra_bytes = probe.extra_bytes()
    result.memory_method = probe.method
    return out


# ----------------------------------------------------------------------------------------------
# inputs and reference


def fill_logits(
    logits: torch.Tensor, true_token: torch.Tensor, gen: torch.Generator, bump: float = 14.0
) -> None:
    """Fill ``logits [..., V]`` with ``2·randn`` plus a random bump in ``[0, bump)`` on each
    row's ``true_token``, a few rows at a time (the high-water mark stays flat).

    The bump makes the perplexity a plausible ~10-1000 instead of ~V.
    """
    vocab = logits.shape[-1]
    flat, flat_true = logits.view(-1, vocab), true_token.reshape(-1)
    rows = max(1, (8 * MiB) // (4 * vocab))
    for start in range(0, flat.shape[0], rows):
        stop = min(start + rows, flat.shape[0])
        z = torch.randn(stop - start, vocab, generator=gen).mul_(2.0)
        lift = torch.rand(stop - start, generator=gen).mul_(bump)
        z[torch.arange(stop - start), flat_true[start:stop]] += lift
        flat[start:stop].copy_(z)


def reference(
    logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None = None
) -> tuple[float, float | None]:
    """Float64 perplexity of ``logits`` against per-row ``target`` and the gradient error.

    Computed from the very values given (bf16 logits are compared with their own rounded
    values), a few rows at a time so the float64 copy never exists whole
    (:func:`_reference.reference_cross_entropy_rows`, the tests' reference). The gradient error
    is ``max |grad - grad_ref| / max |grad_ref|`` of the mean loss (``None`` without ``grad``).
    """
    ref = _reference.reference_cross_entropy_rows(
        logits, target, grad, block_bytes=16 * MiB, stats=False
    )
    ppl = float(torch.tensor(ref["loss"], dtype=torch.float64).exp())
    if grad is None:
        return ppl, None
    return ppl, ref["grad_max_abs_err"] / ref["grad_max_ref"]


# ----------------------------------------------------------------------------------------------
# child processes and timing


def child_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """A forkserver context whose server has imported ``preload`` (and nothing has threads)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def child_setup(parent_pid: int, threads: int) -> None:
    """First thing in a child: exit if the parent dies; use ``threads`` torch threads."""
    _exit_with(parent_pid)
    torch.set_num_threads(threads)


def _exit_with(parent_pid: int) -> None:
    """End this process soon after ``parent_pid`` is gone (a killed run leaves no busy child)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


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


def time_interleaved(
    builders: dict[str, Callable[[], Callable[[], Any]]],
    repeats: int,
    after_each: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Median-ready times of several calls made round-robin in this process.

    ``builders[impl]()`` returns the zero-argument call of ``impl``; each is called once as a
    warm-up at full size, then all ``repeats`` times in turn (``after_each`` runs after every
    call, outside the timed region, e.g. to drop a gradient). Round-robin order means a burst of
    load from other processes hits every implementation alike, so the ratios hold up better than
    the absolute times on a shared machine. Returns ``{"times": {impl: [s, …]}, "errors": {impl:
    message}, "background_cpu": share of all cores other processes used meanwhile}``.
    """
    times: dict[str, list[float]] = {impl: [] for impl in builders}
    errors: dict[str, str] = {}
    calls = {}
    for impl, build in builders.items():
        try:
            calls[impl] = build()
            calls[impl]()  # warm-up at full size
        except Exception:
            errors[impl] = last_error_line()
            calls.pop(impl, None)
        after_each()
    before = _cpu_sample()
    for _ in range(repeats):
        for impl, call in calls.items():
            gc.collect()
            t0 = time.perf_counter()
            out = call()
            times[impl].append(time.perf_counter() - t0)
            del out
            after_each()
    after = _cpu_sample()
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    background = max(0.0, busy - own) / total if total > 0 else None
    return {"times": times, "errors": errors, "background_cpu": background}


def run_in_child(fn: Callable[..., Any], arg: Any, ctx: multiprocessing.context.BaseContext) -> Any:
    """``fn(arg, parent_pid)`` in a new process, so its memory high-water mark is its own."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, arg, os.getpid()).result()


def background_share(seconds: float) -> float | None:
    """Share of all cores that other processes kept busy during the next ``seconds``."""
    before = _cpu_sample()
    time.sleep(seconds)
    after = _cpu_sample()
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, busy - own) / total if total > 0 else None


def wait_for_quiet(max_share: float, timeout_s: float, window_s: float = 3.0) -> bool:
    """Wait (at most ``timeout_s``) until other processes use under ``max_share`` of the cores
    for ``window_s`` seconds; whether that happened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        share = background_share(window_s)
        if share is None or share < max_share:
            return True
    return False


def run_group(
    group: GroupLike,
    ctx: multiprocessing.context.BaseContext,
    measure_memory: Callable[[Any, int], Result],
    measure_times: Callable[[Any, int], dict[str, Any]],
    make_result: Callable[..., Result] = Result,
    max_background: float | None = None,
    retries: int = 0,
    quiet_timeout_s: float = 120.0,
) -> list[Result]:
    """Memory of each case of ``group`` (one process each), then the interleaved timing (one).

    ``measure_memory(case, parent_pid)`` and ``measure_times(group, parent_pid)`` are the child
    bodies (module-level functions, so they pickle); ``make_result(case, error=…)`` makes the row
    of a case whose child died. With ``max_background`` (a share of all cores), the timing waits
    for a quiet machine first, and is redone up to ``retries`` times while other processes used
    more than that share; the quietest attempt is kept. Memory does not depend on load.
    """
    results = []
    for impl in group.impls:
        case = group.case(impl)
        try:
            results.append(run_in_child(measure_memory, case, ctx))
        except Exception as exc:  # e.g. the child was killed for memory
            results.append(make_result(case, error=f"{type(exc).__name__}: {exc}"))
    timed: dict[str, Any] | None = None
    attempts = 0
    for _ in range(1 + max(0, retries) if max_background is not None else 1):
        if max_background is not None:
            wait_for_quiet(max_background, quiet_timeout_s)
        attempts += 1
        try:
            attempt = run_in_child(measure_times, group, ctx)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            attempt = {"times": {}, "errors": dict.fromkeys(group.impls, error)}
        share = attempt.get("background_cpu")
        best = None if timed is None else timed.get("background_cpu")
        if timed is None or (share is not None and best is not None and share < best):
            timed = attempt
        if max_background is None or share is None or share <= max_background:
            break
    assert timed is not None
    for res in results:
        res.times_s = timed["times"].get(res.case.impl, [])
        res.background_cpu = timed.get("background_cpu")
        res.timing_attempts = attempts
        if res.error is None and res.case.impl in timed["errors"]:
            res.error = timed["errors"][res.case.impl]
    return results


def add_common_options(parser: argparse.ArgumentParser, *, repeats: int, only_example: str) -> None:
    """The options every CPU benchmark shares: --quick, --repeats, --threads, --only, --json."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="timed calls per case (median)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the groups whose label contains TEXT (repeatable), "
        f'e.g. --only "{only_example}"',
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    add_load_options(parser)


def parse_common(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


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
    """``run_group`` keywords from the options of :func:`add_load_options`."""
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
        f"120 s for a quiet 3 s window) while other processes used more than "
        f"{100 * policy['max_background']:.0f}% of all cores during it; the quietest is kept"
    )


# ----------------------------------------------------------------------------------------------
# report


def machine_info() -> dict[str, str]:
    """CPU model, core count, memory, library versions and the date."""
    import torchmetrics

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
        "torchmetrics": torchmetrics.__version__,
        "lossplug": lossplug.__version__,
        "lossplug_source": lossplug_source(lossplug.__file__),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


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


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def header(title: str, info: dict[str, str], threads: int, method: str) -> str:
    """The report's title and the machine, versions, date, command and method lines."""
    return (
        f"# {title}\n\n"
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
        f"torch threads {threads}\n"
        f"- python {info['python']}, torch {info['torch']}, "
        f"torchmetrics {info['torchmetrics']}, lossplug {info['lossplug']}\n"
        f"- lossplug source: {info.get('lossplug_source', 'n/a')}\n"
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


def progress_line(res: Result, label: str) -> str:
    """One line per measured case while the run goes on."""
    status = res.error or (
        f"{fmt(res.median_s, '.3f')} s, +{fmt((res.extra_bytes or 0) / MiB, '.0f')} "
        f"MiB, ppl rel err {fmt(res.ppl_rel_err, '.1e')}, "
        f"background CPU {fmt(pct(res.background_cpu), '.0f')}%"
    )
    if res.timing_attempts > 1:
        status += f" (timing attempts: {res.timing_attempts})"
    return f"  {label} {status}"


def pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def ms(res: Result) -> str:
    """Median time of ``res`` in milliseconds, for a table cell."""
    return fmt(None if res.median_s is None else res.median_s * 1e3, ".1f")


def mib(nbytes: int | None) -> str:
    return fmt(None if nbytes is None else nbytes / MiB, ".0f")


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table; a short row (an error) is padded with empty cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = list(row) + [""] * (len(head) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(path: str, info: dict[str, str], results: Sequence[Result]) -> None:
    """The raw results, with the derived median and perplexity error, as JSON."""
    payload: dict[str, Any] = {
        "machine": info,
        "argv": sys.argv,
        "results": [
            {**asdict(r), "median_s": r.median_s, "ppl_rel_err": r.ppl_rel_err} for r in results
        ],
    }
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


# ----------------------------------------------------------------------------------------------
# contention: the same timing quiet and with busy-looping processes on the cores

_BUSY_LOOP = "import os, time\nppid = os.getppid()\nwhile os.getppid() == ppid:\n    pass\n"


@contextlib.contextmanager
def busy_processes(count: int) -> Iterable[list[subprocess.Popen]]:
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


def add_busy_options(parser: argparse.ArgumentParser) -> None:
    """``--busy N`` and ``--rounds R``: time quiet and with N busy-looping processes."""
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="also time every group with N busy-looping background processes (started and "
        "stopped by this script), quiet and busy alternating for --rounds rounds; prints "
        "lossplug ÷ anchor ratios per round (worst and median) instead of the memory table",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --busy (default 3)")


def contention_ratios(
    group: GroupLike,
    ctx: multiprocessing.context.BaseContext,
    measure_times: Callable[[Any, int], dict[str, Any]],
    pairs: dict[str, tuple[str, ...]],
    busy: int,
    rounds: int,
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """lossplug ÷ anchor time ratios of ``group``, quiet and with ``busy`` busy processes.

    Each round times the group once quiet and once busy (each in a fresh child, calls
    interleaved round-robin), so slow drifts in other load hit both alike. Returns
    ``{(ours, anchor, n_busy): {"ratios": [...], "ours_ms": [...], "anchor_ms": [...],
    "load": [...]}}``.
    """
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for _ in range(max(1, rounds)):
        for n_busy in (0, busy):
            with busy_processes(n_busy):
                timed = run_in_child(measure_times, group, ctx)
                load = loadavg().split()[0]
            medians = {impl: statistics.median(ts) for impl, ts in timed["times"].items() if ts}
            for ours, anchors in pairs.items():
                for anchor in anchors:
                    if ours not in medians or anchor not in medians:
                        continue
                    row = out.setdefault(
                        (ours, anchor, n_busy),
                        {"ratios": [], "ours_ms": [], "anchor_ms": [], "load": []},
                    )
                    row["ratios"].append(medians[ours] / medians[anchor])
                    row["ours_ms"].append(1e3 * medians[ours])
                    row["anchor_ms"].append(1e3 * medians[anchor])
                    row["load"].append(load)
    return out


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


def run_contention(
    groups: Sequence[GroupLike],
    ctx: multiprocessing.context.BaseContext,
    measure_times: Callable[[Any, int], dict[str, Any]],
    pairs_of: Callable[[Any], dict[str, tuple[str, ...]]],
    busy: int,
    rounds: int,
) -> str:
    """The ``--busy`` report of a benchmark: ratios of every group quiet and busy, one table."""
    table: list[list[str]] = []
    for group in groups:
        ratios = contention_ratios(group, ctx, measure_times, pairs_of(group), busy, rounds)
        rows = contention_table(getattr(group, "label", ""), ratios)
        for row in rows:
            print("  " + " | ".join(row), flush=True)
        table += rows
    title = f"### Contention: quiet and with {busy} busy processes, {rounds} rounds"
    return "\n".join(["", title, "", *markdown_table(CONTENTION_HEAD, table)])


# ----------------------------------------------------------------------------------------------
# the command line of a CPU benchmark: what is the same in every script


@dataclass
class BenchmarkSpec:
    """What one CPU benchmark script adds to the shared command line of :func:`run_benchmark`.

    The callables run in the parent process only (the children get the module-level
    ``measure_memory`` and ``measure_times``, which pickle).
    """

    title: str  # "lossplug X CPU": the reports are "<title> benchmark" and "<title> contention"
    description: str  # the --help line
    preload: Sequence[str]  # modules the forkserver imports once (see :func:`child_context`)
    repeats: int  # default of --repeats
    only_example: str  # an --only value for the help text
    plan: Callable[[argparse.Namespace, str], list[Any]]  # (args, scratch folder) -> groups
    measure_memory: Callable[[Any, int], Result]
    measure_times: Callable[[Any, int], dict[str, Any]]
    method: Callable[[argparse.Namespace, list[Any], dict[str, Any]], str]  # (args, groups, policy)
    progress: Callable[[Result], str]  # one line per measured case
    notes: Sequence[str]  # lines printed after the footer, before the tables
    report: Callable[[list[Result], list[Any]], str]  # the tables: (results, groups) -> markdown
    pairs: Callable[[Any], dict[str, tuple[str, ...]]]  # group -> {lossplug impl: its anchors}
    make_result: Callable[..., Result] = Result  # the row of a case whose child died
    anchor_name: str = "anchor"  # in the --busy method line: "median lossplug ÷ median ..."
    contention_note: str = ""  # appended to the --busy method line
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    check_arguments: Callable[[argparse.ArgumentParser, argparse.Namespace], None] = (
        lambda parser, args: None
    )
    extend_info: Callable[[dict[str, str]], None] = lambda info: None  # benchmark report only
    before_group: Callable[[Any, multiprocessing.context.BaseContext], None] = lambda group, ctx: (
        None
    )
    after_group: Callable[[Any], None] = lambda group: None
    errors_allowed: tuple[str, ...] = ()  # impls whose failure does not fail the run


def run_benchmark(spec: BenchmarkSpec, argv: list[str] | None = None) -> int:
    """Parse the command line, run the groups of ``spec.plan``, print the report; exit status.

    The options are :func:`add_common_options`, the script's own (``spec.add_arguments``) and
    :func:`add_busy_options`; ``--busy N`` runs :func:`contention_main` instead. A scratch folder
    (removed at the end) is handed to ``spec.plan`` for files the children share.
    """
    parser = argparse.ArgumentParser(description=spec.description)
    add_common_options(parser, repeats=spec.repeats, only_example=spec.only_example)
    spec.add_arguments(parser)
    add_busy_options(parser)
    args = parse_common(parser, argv)
    spec.check_arguments(parser, args)
    with tempfile.TemporaryDirectory(prefix="lossplug-bench-") as workdir:
        if args.busy > 0:
            return contention_main(spec, args, workdir)
        return _benchmark_main(spec, args, workdir)


def _benchmark_main(spec: BenchmarkSpec, args: argparse.Namespace, workdir: str) -> int:
    policy = load_policy(args)
    ctx = child_context(spec.preload)
    info = machine_info()
    spec.extend_info(info)
    groups = spec.plan(args, workdir)
    method = spec.method(args, groups, policy)
    print(header(f"{spec.title} benchmark", info, args.threads, method), flush=True)
    results: list[Result] = []
    load_before = loadavg()
    t_start = time.perf_counter()
    for group in groups:
        spec.before_group(group, ctx)
        for res in run_group(
            group, ctx, spec.measure_memory, spec.measure_times, spec.make_result, **policy
        ):
            results.append(res)
            print(spec.progress(res), flush=True)
        spec.after_group(group)
    # other processes on a small machine inflate wall times: say how busy it was
    print(footer(results, load_before, time.perf_counter() - t_start))
    for line in spec.notes:
        print(line)
    print(spec.report(results, groups))
    if args.json:
        write_json(args.json, info, results)
    failed = any(r.error for r in results if r.case.impl not in spec.errors_allowed)
    return 1 if failed else 0


def contention_main(spec: BenchmarkSpec, args: argparse.Namespace, workdir: str) -> int:
    """``--busy N``: lossplug ÷ anchor time ratios, quiet and with N busy processes."""
    ctx = child_context(spec.preload)
    method = (
        f"--busy {args.busy}: each group timed {args.rounds} rounds, each round quiet then with "
        f"{args.busy} busy-looping processes (fresh child each, {args.repeats} interleaved calls "
        f"per impl); ratio = median lossplug ÷ median {spec.anchor_name} of one timing"
        f"{spec.contention_note}"
    )
    title = f"{spec.title} contention"
    print(header(title, machine_info(), args.threads, method), flush=True)
    groups = spec.plan(args, workdir)
    print(
        run_contention(groups, ctx, spec.measure_times, spec.pairs, args.busy, args.rounds),
        flush=True,
    )
    return 0
