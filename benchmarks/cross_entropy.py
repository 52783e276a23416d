"""CPU benchmark of ``lossplug.cross_entropy`` (torch backend) against its anchors.

Two jobs are measured side by side on the same inputs:

* eval (forward only, ``torch.no_grad()``): perplexity from lossplug's ``TokenStats`` against
  ``torchmetrics.text.Perplexity`` (update + compute) and ``exp(F.cross_entropy)``;
* train (forward + backward): lossplug against ``F.cross_entropy``, and lossplug ``shift=True``
  against the Hugging Face causal-LM shift pattern.

Peak extra memory (resident set size above the inputs) comes from one cold call of each case in
its own child process, so memory an earlier case left mapped cannot hide it; the same call gives
the perplexity (and gradient) error against a float64 reference computed from the very values
the case saw (bf16 inputs are compared with their own rounded values). Times are the median of
``--repeats`` calls, lossplug and its anchors interleaved round-robin in one child process per
group, so load from other processes hits all of them alike; that load is reported too.

Usage::

    python benchmarks/cross_entropy.py              # full run (a few minutes on 2 cores)
    python benchmarks/cross_entropy.py --quick      # tiny shapes, smoke test
    python benchmarks/cross_entropy.py --repeats 9 --json results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
MiB = 2**20
# Children are forked from a server that has only imported these modules: starting a case
# costs milliseconds instead of the ~2 s of a fresh interpreter, and no thread pool exists yet
# in the server (forking after OpenMP has started its threads can hang the child).
PRELOAD = ["torch", "torch.nn.functional", "torchmetrics.text", "lossplug"]

EVAL_IMPLS = ("lossplug", "torchmetrics", "F.cross_entropy")
TRAIN_IMPLS = ("lossplug", "F.cross_entropy", "lossplug shift=True", "HF shift pattern")
# lossplug row -> the anchors it is compared with
PAIRS = {
    "eval": {"lossplug": ("torchmetrics", "F.cross_entropy")},
    "train": {"lossplug": ("F.cross_entropy",), "lossplug shift=True": ("HF shift pattern",)},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    task: str  # "eval" or "train"
    impl: str
    shape: tuple[int, int, int]  # batch, sequence, vocabulary
    dtype: str  # key of DTYPES
    threads: int
    seed: int = 0


@dataclass(frozen=True)
class Group:
    """The cases timed together, on the same inputs, calls interleaved."""

    task: str
    shape: tuple[int, int, int]
    dtype: str
    impls: tuple[str, ...]
    repeats: int
    threads: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.task} {'x'.join(map(str, self.shape))} {self.dtype}"

    def case(self, impl: str) -> Case:
        return Case(self.task, impl, self.shape, self.dtype, self.threads, self.seed)


@dataclass
class Result:
    """What the child processes measured for one case."""

    case: Case
    times_s: list[float] = field(default_factory=list)
    background_cpu: float | None = None  # share of all cores used by other processes
    extra_bytes: int | None = None
    memory_method: str = ""
    grad_bytes: int | None = None
    ppl: float | None = None
    ppl_ref: float | None = None
    grad_err: float | None = None
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def ppl_rel_err(self) -> float | None:
        if self.ppl is None or self.ppl_ref is None:
            return None
        return abs(self.ppl - self.ppl_ref) / self.ppl_ref


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


class PeakProbe:
    """Peak resident memory above the moment :meth:`start` was called, in bytes."""

    def start(self) -> None:
        gc.collect()
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


# ----------------------------------------------------------------------------------------------
# inputs and reference


def make_inputs(
    shape: tuple[int, int, int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[B, S, V]`` and both label layouts, built a few rows at a time.

    Returns ``(logits, target, labels)``: ``target[b, t]`` is the token position ``t`` predicts
    (for the unshifted call), ``labels`` the Hugging Face layout with ``labels[b, t + 1] ==
    target[b, t]``. The first sixteenth of each sequence is masked with ``ignore_index`` as in
    supervised fine-tuning (prompt tokens). Each row's logit of its next token gets a random bump
    so that the perplexity is a plausible ~10-1000 instead of ~V.
    """
    batch, seq, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    nxt = tokens[:, 1:].contiguous()
    logits = torch.empty(shape, dtype=dtype)
    flat, flat_next = logits.view(-1, vocab), nxt.view(-1)
    rows = max(1, (8 * MiB) // (4 * vocab))  # small chunks keep the high-water mark flat
    for start in range(0, batch * seq, rows):
        stop = min(start + rows, batch * seq)
        z = torch.randn(stop - start, vocab, generator=gen).mul_(2.0)
        bump = torch.rand(stop - start, generator=gen).mul_(14.0)
        z[torch.arange(stop - start), flat_next[start:stop]] += bump
        flat[start:stop].copy_(z)
    prompt = max(1, seq // 16)
    target = nxt.clone()
    target[:, :prompt] = IGNORE
    labels = tokens[:, :seq].clone()
    labels[:, : prompt + 1] = IGNORE
    return logits, target, labels


def reference(
    logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None
) -> tuple[float, float | None]:
    """Float64 perplexity of ``logits`` against per-row ``target`` and the gradient error.

    The gradient error is ``max |grad - grad_ref| / max |grad_ref|`` of the mean loss; computed a
    few rows at a time so the float64 copy never exists whole.
    """
    vocab = logits.shape[-1]
    flat, y = logits.reshape(-1, vocab), target.reshape(-1)
    valid = y != IGNORE
    count = int(valid.sum())
    rows = max(1, (16 * MiB) // (8 * vocab))
    nll_sum = 0.0
    err_max, ref_max = 0.0, 0.0
    g_flat = grad.reshape(-1, vocab) if grad is not None else None
    for start in range(0, flat.shape[0], rows):
        sl = slice(start, min(start + rows, flat.shape[0]))
        z = flat[sl].double()
        yv, ok = y[sl].clamp(min=0), valid[sl]
        lse = torch.logsumexp(z, dim=1)
        nll = lse - z.gather(1, yv[:, None]).squeeze(1)
        nll_sum += float(nll[ok].sum())
        if g_flat is not None:
            g_ref = torch.exp(z - lse[:, None])
            g_ref[torch.arange(z.shape[0]), yv] -= 1.0
            g_ref.mul_(ok[:, None].double() / count)
            err_max = max(err_max, float((g_flat[sl].double() - g_ref).abs().max()))
            ref_max = max(ref_max, float(g_ref.abs().max()))
    ppl = float(torch.tensor(nll_sum / count, dtype=torch.float64).exp())
    return ppl, (err_max / ref_max if g_flat is not None else None)


def shifted_target(labels: torch.Tensor) -> torch.Tensor:
    """Per-position target of the shift pattern: ``labels[t + 1]``, the last position ignored."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)


# ----------------------------------------------------------------------------------------------
# the measured calls


def build_call(
    case: Case, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one eval/train step; returns the perplexity tensor."""
    import torchmetrics.text

    import lossplug

    vocab = logits.shape[-1]
    upcast = logits.dtype != torch.float32  # users upcast bf16 before F.cross_entropy

    if case.task == "eval":
        if case.impl == "lossplug":

            def call() -> torch.Tensor:
                with torch.no_grad():
                    _, stats = lossplug.cross_entropy(
                        logits, target, return_stats=True, backend="torch"
                    )
                    return stats.perplexity

        elif case.impl == "torchmetrics":
            metric = torchmetrics.text.Perplexity(ignore_index=IGNORE)

            def call() -> torch.Tensor:
                with torch.no_grad():
                    metric.reset()
                    metric.update(logits, target)
                    return metric.compute()

        elif case.impl == "F.cross_entropy":

            def call() -> torch.Tensor:
                with torch.no_grad():
                    x = logits.float() if upcast else logits
                    loss = F.cross_entropy(x.view(-1, vocab), target.view(-1))
                    return loss.double().exp()

        else:
            raise ValueError(case.impl)
        return call

    if case.impl == "lossplug":

        def loss_fn() -> torch.Tensor:
            return lossplug.cross_entropy(logits, target, backend="torch")

    elif case.impl == "lossplug shift=True":

        def loss_fn() -> torch.Tensor:
            return lossplug.cross_entropy(logits, labels, shift=True, backend="torch")

    elif case.impl == "F.cross_entropy":

        def loss_fn() -> torch.Tensor:
            x = logits.float() if upcast else logits
            return F.cross_entropy(x.view(-1, vocab), target.view(-1))

    elif case.impl == "HF shift pattern":

        def loss_fn() -> torch.Tensor:
            # verbatim from transformers' causal-LM loss before it grew num_items_in_batch
            shift_logits = logits[:, :-1].contiguous().view(-1, vocab).float()
            return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1))

    else:
        raise ValueError(case.impl)

    def train_call() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach().double().exp()

    return train_call


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


def _warm_up(case: Case) -> None:
    """A tiny run of the same call: thread pools, lazy imports and dispatch caches get set up."""
    small = make_inputs((2, 16, 64), DTYPES[case.dtype], case.seed)
    small[0].requires_grad_(case.task == "train")
    build_call(case, *small)()


def measure_memory(case: Case, parent_pid: int) -> Result:
    """Child-process body: peak extra memory of one cold call, and its error vs float64."""
    _exit_with(parent_pid)
    torch.set_num_threads(case.threads)
    result = Result(case)
    try:
        _warm_up(case)
        logits, target, labels = make_inputs(case.shape, DTYPES[case.dtype], case.seed)
        logits.requires_grad_(case.task == "train")
        call = build_call(case, logits, target, labels)

        probe = PeakProbe()
        probe.start()
        out = call()  # the cold call: nothing of it is cached anywhere yet
        result.extra_bytes = probe.extra_bytes()
        result.memory_method = probe.method
        result.ppl = float(out)

        grad = logits.grad if case.task == "train" else None
        if grad is not None:
            result.grad_bytes = grad.numel() * grad.element_size()
        shifted = case.impl in ("lossplug shift=True", "HF shift pattern")
        per_row = shifted_target(labels) if shifted else target
        result.ppl_ref, result.grad_err = reference(logits.detach(), per_row, grad)
    except Exception:  # reported in the table instead of ending the whole run
        result.error = traceback.format_exc(limit=3).strip().splitlines()[-1]
    return result


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


def measure_times(group: Group, parent_pid: int) -> dict[str, Any]:
    """Child-process body: interleaved timed calls of every impl of ``group`` on one input.

    Round-robin order means a burst of load from other processes hits lossplug and its anchors
    alike, so the ratios hold up better than the absolute times on a shared machine.
    """
    _exit_with(parent_pid)
    torch.set_num_threads(group.threads)
    times: dict[str, list[float]] = {impl: [] for impl in group.impls}
    errors: dict[str, str] = {}
    logits, target, labels = make_inputs(group.shape, DTYPES[group.dtype], group.seed)
    logits.requires_grad_(group.task == "train")
    calls = {}
    for impl in group.impls:
        try:
            calls[impl] = build_call(group.case(impl), logits, target, labels)
            calls[impl]()  # warm-up at full size
        except Exception:
            errors[impl] = traceback.format_exc(limit=3).strip().splitlines()[-1]
            calls.pop(impl, None)
        logits.grad = None
    before = _cpu_sample()
    for _ in range(group.repeats):
        for impl, call in calls.items():
            gc.collect()
            t0 = time.perf_counter()
            out = call()
            times[impl].append(time.perf_counter() - t0)
            del out
            logits.grad = None
    after = _cpu_sample()
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    background = max(0.0, busy - own) / total if total > 0 else None
    return {"times": times, "errors": errors, "background_cpu": background}


def run_in_child(
    fn: Callable[..., Any], arg: Case | Group, ctx: multiprocessing.context.BaseContext
) -> Any:
    """``fn(arg)`` in a new process, so its memory high-water mark is its own."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, arg, os.getpid()).result()


def run_group(group: Group, ctx: multiprocessing.context.BaseContext) -> list[Result]:
    """Memory of each case (one process each), then the interleaved timing (one process)."""
    results = []
    for impl in group.impls:
        case = group.case(impl)
        try:
            results.append(run_in_child(measure_memory, case, ctx))
        except Exception as exc:  # e.g. the child was killed for memory
            results.append(Result(case, error=f"{type(exc).__name__}: {exc}"))
    try:
        timed = run_in_child(measure_times, group, ctx)
    except Exception as exc:
        timed = {"times": {}, "errors": dict.fromkeys(group.impls, f"{type(exc).__name__}: {exc}")}
    for res in results:
        res.times_s = timed["times"].get(res.case.impl, [])
        res.background_cpu = timed.get("background_cpu")
        if res.error is None and res.case.impl in timed["errors"]:
            res.error = timed["errors"][res.case.impl]
    return results


# ----------------------------------------------------------------------------------------------
# report


def machine_info() -> dict[str, str]:
    """CPU model, core count, library versions and the date."""
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
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def _ratio(num: float | int | None, den: float | int | None) -> str:
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def format_tables(results: list[Result]) -> str:
    """Markdown tables: each lossplug row, then its anchors with lossplug ÷ anchor ratios."""
    lines: list[str] = []
    for task, title in (
        ("eval", "Perplexity / eval, forward only under torch.no_grad()"),
        ("train", "Training loss, forward + backward"),
    ):
        rows = [r for r in results if r.case.task == task]
        if not rows:
            continue
        lines += ["", f"### {title}", ""]
        head = ["shape", "dtype", "impl", "median ms", "extra MiB"]
        if task == "train":
            head += ["extra / grad buf", "grad err"]
        head += ["ppl rel err", "lossplug time ratio", "lossplug mem ratio", "bg CPU"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_key = {(r.case.shape, r.case.dtype, r.case.impl): r for r in rows}
        for (shape, dtype, impl), res in by_key.items():
            ours = None
            for mine, anchors in PAIRS[task].items():
                if impl in anchors:
                    ours = by_key.get((shape, dtype, mine))
            cells = [
                "x".join(map(str, shape)),
                dtype,
                impl if ours is None else f"  {impl}",
            ]
            if res.error:
                cells += [f"error: {res.error}"] + [""] * (len(head) - 4)
                lines.append("| " + " | ".join(cells) + " |")
                continue
            extra = res.extra_bytes
            cells += [
                _fmt(None if res.median_s is None else res.median_s * 1e3, ".1f"),
                _fmt(None if extra is None else extra / MiB, ".0f"),
            ]
            if task == "train":
                cells += [_ratio(extra, res.grad_bytes), _fmt(res.grad_err, ".1e")]
            cells.append(_fmt(res.ppl_rel_err, ".1e"))
            if ours is None or ours.error:
                cells += ["—", "—"]
            else:
                cells += [_ratio(ours.median_s, res.median_s), _ratio(ours.extra_bytes, extra)]
            cells.append(_fmt(_pct(res.background_cpu), ".0f") + "%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> list[Group]:
    """The groups to run: each lossplug impl with the anchors it is compared with."""
    if args.quick:
        shapes = [(2, 64, 1000)]
        train_shapes = shapes
    else:
        shapes = [(4, 512, 32000), (2, 1024, 50257)]
        train_shapes = shapes + ([] if args.skip_large else [(8, 1024, 32000)])
    groups = []
    for task, task_shapes, impls in (
        ("eval", shapes, EVAL_IMPLS),
        ("train", train_shapes, TRAIN_IMPLS),
    ):
        for shape in task_shapes:
            for dtype in DTYPES:
                groups.append(Group(task, shape, dtype, impls, args.repeats, args.threads))
    if args.only:
        groups = [g for g in groups if any(text in g.label for text in args.only)]
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--skip-large", action="store_true", help="leave out the [8, 1024, 32000] training case"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help='run only the groups whose "task shape dtype" label contains TEXT '
        '(repeatable), e.g. --only "train 8x1024x32000 fp32"',
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    info = machine_info()
    groups = plan(args)
    n_cases = sum(len(g.impls) for g in groups)
    print(
        f"# lossplug cross_entropy CPU benchmark\n\n"
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; "
        f"torch threads {args.threads}\n"
        f"- python {info['python']}, torch {info['torch']}, "
        f"torchmetrics {info['torchmetrics']}, lossplug {info['lossplug']}\n"
        f"- date: {info['date']}\n"
        f"- command: python {shlex.join(sys.argv)}\n"
        f"- {n_cases} cases; peak extra memory and error from one cold call, each case in its own "
        f"process; time = median of {args.repeats} calls per case, lossplug and its anchors "
        f"interleaved in one process per group after a warm-up call each",
        flush=True,
    )
    results: list[Result] = []
    load_before = _loadavg()
    t_start = time.perf_counter()
    for group in groups:
        for res in run_group(group, ctx):
            results.append(res)
            case = res.case
            status = res.error or (
                f"{_fmt(res.median_s, '.3f')} s, +{_fmt((res.extra_bytes or 0) / MiB, '.0f')} "
                f"MiB, ppl rel err {_fmt(res.ppl_rel_err, '.1e')}, "
                f"background CPU {_fmt(_pct(res.background_cpu), '.0f')}%"
            )
            shape = "x".join(map(str, case.shape))
            print(
                f"  {case.task:5s} {shape:>14s} {case.dtype} {case.impl:22s} {status}", flush=True
            )
    # other processes on a small machine inflate wall times: say how busy it was
    print(f"\n- load average before: {load_before}; after: {_loadavg()}")
    methods = sorted({r.memory_method for r in results if r.memory_method})
    print(f"- peak memory method: {', '.join(methods) or 'n/a'}")
    print(f"- total wall time: {time.perf_counter() - t_start:.0f} s")
    print(
        "- ratios are lossplug ÷ anchor (below 1 = lossplug faster / leaner); "
        "extra MiB = peak RSS above the inputs; grad err = max|g - g_ref| / max|g_ref|; "
        "ppl rel err against float64 on the same (rounded) values; bg CPU = share of all "
        "cores used by other processes while the group was timed"
    )
    print(format_tables(results))
    if args.json:
        payload: dict[str, Any] = {
            "machine": info,
            "argv": sys.argv,
            "results": [
                {**asdict(r), "median_s": r.median_s, "ppl_rel_err": r.ppl_rel_err} for r in results
            ],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
