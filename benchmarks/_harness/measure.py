"""Measuring one case: peak extra memory of a cold call, the clock (CUDA events on a GPU),
calls interleaved round-robin on the CPU (:func:`time_interleaved`), one implementation at a time
on a device (:func:`time_on_device`), and the child processes the CPU cases run in.

Children are forked from a forkserver that has only imported the modules named in ``preload``:
starting a case costs milliseconds instead of a fresh interpreter, and no thread pool exists yet
in the server (forking after OpenMP has started its threads can hang the child).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import gc
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cases import Result, last_error_line
from .load import background_meter

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
# child processes


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
