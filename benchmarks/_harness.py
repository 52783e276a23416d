"""What the benchmarks share: inputs, timing, child processes, peak memory, verdicts, reports.

The CPU benchmarks ``cross_entropy.py``, ``metrics.py`` and ``linear_cross_entropy.py`` (run as
``python benchmarks/X.py``, which puts this folder on ``sys.path``) each subclass
:class:`Benchmark` (their cases, anchors and tables) and :func:`run_benchmark` does the rest
(options, groups, child processes, ``--busy`` contention, report, ``--json``).
``callback_overhead.py`` shares the load policy and the report; ``gpu_suite.py`` the inputs, the
timing on a device (:func:`time_on_device`), the tables and the verdicts. The float64 references
are the tests' own, ``tests/_reference.py``.

Each CPU case's peak extra memory comes from one cold call in a child process of its own, so
memory an earlier case left mapped cannot hide it. Times are the median of repeated calls made
round-robin (the implementation under test and its anchors interleaved) in one child process per
group, so load from other processes hits all of them alike; that load is measured too.

Children are forked from a forkserver that has only imported the modules named in ``preload``:
starting a case costs milliseconds instead of a fresh interpreter, and no thread pool exists yet
in the server (forking after OpenMP has started its threads can hang the child).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# the float64 references live with the tests (tests/_reference.py); the benchmarks import them
_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

import _reference  # noqa: E402

IGNORE = _reference.IGNORE
MiB = _reference.MiB
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUIET_TIMEOUT_S = 120.0  # longest wait for a quiet machine before a timing (--max-background)


# ----------------------------------------------------------------------------------------------
# cases, groups, results


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
    logits: torch.Tensor,
    true_token: torch.Tensor,
    gen: torch.Generator,
    bump: float = 14.0,
    block_bytes: int = 8 * MiB,
) -> None:
    """Fill ``logits [..., V]`` with ``2·randn`` plus a random bump in ``[0, bump)`` on each
    row's ``true_token``, ``block_bytes`` of float32 rows at a time (the high-water mark stays
    flat), on the logits' device.

    The bump puts the true class often near the top, as with a trained model: the perplexity is
    a plausible ~10-1000 instead of ~V.
    """
    vocab, device = logits.shape[-1], logits.device
    flat, flat_true = logits.view(-1, vocab), true_token.reshape(-1)
    rows = max(1, block_bytes // (4 * vocab))
    for start in range(0, flat.shape[0], rows):
        stop = min(start + rows, flat.shape[0])
        z = torch.randn(stop - start, vocab, device=device, generator=gen).mul_(2.0)
        lift = torch.rand(stop - start, device=device, generator=gen).mul_(bump)
        z[torch.arange(stop - start, device=device), flat_true[start:stop]] += lift
        flat[start:stop].copy_(z)


def linear_inputs(
    rows: int,
    dim: int,
    vocab: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    block_bytes: int = 8 * MiB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [rows, dim]``, ``weight [vocab, dim]`` and targets ``[rows]`` (none ignored),
    built ``block_bytes`` of float32 rows at a time on the generator's device.

    ``weight`` is ``2 randn / sqrt(dim)`` (logits of standard deviation about 2); each hidden row
    is ``randn`` plus a random multiple in ``[0, 14)`` of ``weight[y] / |weight[y]|²``, which
    lifts the logit of its target by that much, so the loss is a plausible ~5-6 nats instead of
    ``log V``, as with a trained model.
    """
    device = gen.device
    step = max(1, block_bytes // (4 * dim))
    weight = torch.empty(vocab, dim, device=device, dtype=dtype)
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        w = torch.randn(stop - start, dim, device=device, generator=gen)
        weight[start:stop].copy_(w.mul_(2.0 / dim**0.5))
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    hidden = torch.empty(rows, dim, device=device, dtype=dtype)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w_true = weight.index_select(0, target[start:stop]).float()  # the rounded values
        bump = torch.rand(stop - start, device=device, generator=gen).mul_(14.0)
        h = torch.randn(stop - start, dim, device=device, generator=gen)
        h.addcmul_(w_true, (bump / w_true.square().sum(dim=1))[:, None])
        hidden[start:stop].copy_(h)
    return hidden, weight, target


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
# timing: interleaved on the CPU, one implementation at a time on a device


def elapsed_s(call: Callable[[], Any], device: torch.device | None = None) -> float:
    """Seconds one ``call()`` takes: CUDA events on a CUDA device (a host clock would time the
    launches, not the kernels), ``perf_counter`` otherwise."""
    if device is None or device.type != "cuda":
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        del out  # freed outside the timed region
        return seconds
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    """Give cached blocks back, so that the next measurement's peak starts from what is live."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_on_device(
    run: Callable[[], object],
    reset: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[list[float], int | None]:
    """Times of ``run`` in ms, one after the other, and its peak extra memory on a CUDA device.

    ``reset`` runs between calls, outside the timed region (dropping gradients, restoring
    clobbered inputs). The peak is measured on one call after the warm-up (compilation and
    autotuning are done by then), above what was allocated before it; None off CUDA.
    """
    for _ in range(warmup):
        run()
        reset()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        reset()
    times = []
    for _ in range(repeats):
        sync(device)  # no earlier work in the timed region
        times.append(1e3 * elapsed_s(run, device))
        reset()
    return times, peak


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
    with background_meter() as load:
        for _ in range(repeats):
            for impl, call in calls.items():
                gc.collect()
                times[impl].append(elapsed_s(call))
                after_each()
    return {"times": times, "errors": errors, "background_cpu": load["share"]}


# ----------------------------------------------------------------------------------------------
# child processes and the load policy


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


def run_in_child(fn: Callable[..., Any], arg: Any, ctx: multiprocessing.context.BaseContext) -> Any:
    """``fn(arg, parent_pid)`` in a new process, so its memory high-water mark is its own."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, arg, os.getpid()).result()


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


# ----------------------------------------------------------------------------------------------
# report


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


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


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


# ----------------------------------------------------------------------------------------------
# contention: the same timing quiet and with busy-looping processes on the cores

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


def contention_ratios(
    bench: Benchmark,
    group: Group,
    ctx: multiprocessing.context.BaseContext,
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
                timed = run_in_child(measure_times, (bench, group), ctx)
                load = loadavg().split()[0]
            medians = {impl: statistics.median(ts) for impl, ts in timed["times"].items() if ts}
            for ours, anchors in bench.pairs(group).items():
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


# ----------------------------------------------------------------------------------------------
# a CPU benchmark script: what is the same in every one


class Benchmark:
    """One CPU benchmark script: a subclass sets the class attributes and overrides
    :meth:`inputs`, :meth:`build_call`, :meth:`measure`, :meth:`plan` and :meth:`report`; the
    other methods have defaults. :func:`run_benchmark` does the rest.

    The first three run in the child processes (the instance is pickled, by its class's name),
    everything else in the parent.
    """

    title = ""  # "lossplug X CPU": the reports are "<title> benchmark" and "<title> contention"
    description = ""  # the --help line
    preload: Sequence[str] = ("torch", "lossplug")  # what the forkserver imports once
    repeats = 5  # default of --repeats
    only_example = ""  # an --only value for the help text
    notes: Sequence[str] = ()  # lines printed after the footer, before the tables
    anchor_name = "anchor"  # in the --busy method line: "median lossplug ÷ median ..."
    contention_note = ""  # appended to the --busy method line
    errors_allowed: tuple[str, ...] = ()  # impls whose failure does not fail the run
    result_type: type[Result] = Result  # also the row of a case whose child died
    # the method line of the report: "<job><measured> from one cold call, ..., <interleaved>
    # interleaved in one process per group after <warm_up> each"
    job = ""
    measured = "peak extra memory and error"
    interleaved = "lossplug and its anchors"
    warm_up = "a warm-up call"

    def inputs(self, case: Any) -> tuple[torch.Tensor, ...]:
        """The inputs of ``case`` (of its group: the same for every impl), built in a child; a
        gradient of any of them is dropped after each timed call."""
        raise NotImplementedError

    def build_call(self, case: Any, *inputs: torch.Tensor) -> Callable[[], Any]:
        """The zero-argument call of ``case.impl`` on ``inputs``, the one timed."""
        raise NotImplementedError

    def measure(self, case: Any, result: Result) -> None:
        """In a child of its own: fill ``result`` from one cold call of ``case``
        (:func:`cold_call`), and its errors against float64; an exception is the row's error."""
        raise NotImplementedError

    def plan(self, args: argparse.Namespace, workdir: str) -> list[Group]:
        """The groups to run (``--only`` is applied afterwards); ``workdir`` is a scratch
        folder the children may share files through, removed at the end."""
        raise NotImplementedError

    def method(self, args: argparse.Namespace) -> str:
        """What is measured and how: the middle of the method line of the report."""
        return (
            f"{self.job}{self.measured} from one cold call, each case in its own process; time = "
            f"median of {self.timed_calls(args)}, {self.interleaved} interleaved in one process "
            f"per group after {self.warm_up} each"
        )

    def timed_calls(self, args: argparse.Namespace) -> str:
        return f"{args.repeats} calls per case"

    def report(self, results: list[Any], groups: list[Group]) -> str:
        """The tables, in Markdown."""
        raise NotImplementedError

    def pairs(self, group: Group) -> dict[str, tuple[str, ...]]:
        """``{lossplug impl: the anchors it is compared with}`` of ``group``."""
        return {"lossplug": tuple(i for i in group.timed if i != "lossplug")}

    def progress(self, res: Any) -> str:
        """One line per measured case while the run goes on."""
        return progress_line(res, res.case.impl)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The script's own options."""

    def check_arguments(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Reject bad values of the script's own options with ``parser.error``."""

    def info(self) -> dict[str, str]:
        """The machine and versions of the report's header."""
        return machine_info()

    def before_group(self, group: Group, ctx: multiprocessing.context.BaseContext) -> None:
        """Runs in the parent before the group's children (e.g. to write a shared file)."""

    def after_group(self, group: Group) -> None:
        """Runs in the parent after the group's children."""

    def main(self, argv: list[str] | None = None) -> int:
        return run_benchmark(self, argv)


def measure_memory(job: tuple[Benchmark, Any], parent_pid: int) -> Result:
    """Child-process body: :meth:`Benchmark.measure` of one case."""
    bench, case = job
    child_setup(parent_pid, case.threads)
    result = bench.result_type(case)
    try:
        bench.measure(case, result)
    except Exception:  # reported in the table instead of ending the whole run
        result.error = last_error_line()
    return result


def measure_times(job: tuple[Benchmark, Group], parent_pid: int) -> dict[str, Any]:
    """Child-process body: :func:`time_interleaved` of the timed impls of a group, on one set of
    inputs."""
    bench, group = job
    child_setup(parent_pid, group.setup.threads)
    inputs = bench.inputs(group.setup)
    builders = {
        impl: functools.partial(bench.build_call, group.case(impl), *inputs) for impl in group.timed
    }

    def drop_grads() -> None:
        for tensor in inputs:
            tensor.grad = None

    return time_interleaved(builders, group.repeats, after_each=drop_grads)


def run_benchmark(bench: Benchmark, argv: list[str] | None = None) -> int:
    """Parse the command line, run the groups of ``bench.plan``, print the report; exit status.

    The options are the shared ones (``--quick``, ``--repeats``, ``--threads``, ``--only``,
    ``--json``, the load policy's), the script's own and ``--busy N``/``--rounds``, which run
    :func:`contention_main` instead.
    """
    parser = argparse.ArgumentParser(description=bench.description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    parser.add_argument(
        "--repeats", type=int, default=bench.repeats, help="timed calls per case (median)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the groups whose label contains TEXT (repeatable), "
        f'e.g. --only "{bench.only_example}"',
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    add_load_options(parser)
    bench.add_arguments(parser)
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
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    bench.check_arguments(parser, args)
    with tempfile.TemporaryDirectory(prefix="lossplug-bench-") as workdir:
        groups = bench.plan(args, workdir)
        if args.only:
            groups = [g for g in groups if any(text in g.label for text in args.only)]
        ctx = child_context(bench.preload)
        if args.busy > 0:
            return contention_main(bench, args, groups, ctx)
        return _benchmark_main(bench, args, groups, ctx)


def _benchmark_main(
    bench: Benchmark,
    args: argparse.Namespace,
    groups: list[Group],
    ctx: multiprocessing.context.BaseContext,
) -> int:
    policy = load_policy(args)
    info = bench.info()
    n_cases = sum(len(g.impls) for g in groups)
    method = f"{n_cases} cases; {bench.method(args)}; {describe_policy(policy)}"
    print(header(f"{bench.title} benchmark", info, args.threads, method), flush=True)
    results: list[Result] = []
    load_before = loadavg()
    t_start = time.perf_counter()
    for group in groups:
        bench.before_group(group, ctx)
        for res in run_group(bench, group, ctx, policy):
            results.append(res)
            print(bench.progress(res), flush=True)
        bench.after_group(group)
    # other processes on a small machine inflate wall times: say how busy it was
    print(footer(results, load_before, time.perf_counter() - t_start))
    for line in bench.notes:
        print(line)
    print(bench.report(results, groups))
    if args.json:
        write_json(args.json, results_json(info, results))
    failed = any(r.error for r in results if r.case.impl not in bench.errors_allowed)
    return 1 if failed else 0


def run_group(
    bench: Benchmark,
    group: Group,
    ctx: multiprocessing.context.BaseContext,
    policy: dict[str, Any],
) -> list[Result]:
    """Memory of each case of ``group`` (one process each), then the interleaved timing (one
    process, redone while the machine was busy as ``policy`` says; memory does not depend on
    load)."""
    results = []
    for impl in group.impls:
        case = group.case(impl)
        try:
            results.append(run_in_child(measure_memory, (bench, case), ctx))
        except Exception as exc:  # e.g. the child was killed for memory
            results.append(bench.result_type(case, error=f"{type(exc).__name__}: {exc}"))

    def timing() -> dict[str, Any]:
        try:
            return run_in_child(measure_times, (bench, group), ctx)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            return {"times": {}, "errors": dict.fromkeys(group.impls, error)}

    timed, shares = quietest(timing, policy)
    for res in results:
        res.times_s = timed["times"].get(res.case.impl, [])
        res.background_cpu = timed.get("background_cpu")
        res.timing_attempts = len(shares)
        if res.error is None and res.case.impl in timed["errors"]:
            res.error = timed["errors"][res.case.impl]
    return results


def contention_main(
    bench: Benchmark,
    args: argparse.Namespace,
    groups: list[Group],
    ctx: multiprocessing.context.BaseContext,
) -> int:
    """``--busy N``: lossplug ÷ anchor time ratios of every group, quiet and with N busy
    processes, in one table."""
    method = (
        f"--busy {args.busy}: each group timed {args.rounds} rounds, each round quiet then with "
        f"{args.busy} busy-looping processes (fresh child each, {args.repeats} interleaved calls "
        f"per impl); ratio = median lossplug ÷ median {bench.anchor_name} of one timing"
        f"{bench.contention_note}"
    )
    print(header(f"{bench.title} contention", machine_info(), args.threads, method), flush=True)
    table: list[list[str]] = []
    for group in groups:
        ratios = contention_ratios(bench, group, ctx, args.busy, args.rounds)
        rows = contention_table(group.label, ratios)
        for row in rows:
            print("  " + " | ".join(row), flush=True)
        table += rows
    title = f"### Contention: quiet and with {args.busy} busy processes, {args.rounds} rounds"
    print("\n".join(["", title, "", *markdown_table(CONTENTION_HEAD, table)]), flush=True)
    return 0
