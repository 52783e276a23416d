"""CPU benchmark of ``lossplug.metrics.Perplexity`` against ``torchmetrics.text.Perplexity``.

Both metrics get the same logits ``[B, S, V]`` (fp32 or bf16) and targets of which about 10% are
``-100`` (ignored), and run ``reset()``, ``update(logits, target)`` and ``compute()`` under
``torch.no_grad()``. Measured per case, with the machinery of ``cross_entropy.py`` (in
``_harness.py``): peak extra memory of one cold call in a child process of its own, the median
time of ``--repeats`` calls made round-robin with the other metric in one process, and the
perplexity's relative error against a float64 reference computed on the very values the metric
saw (bf16 logits are compared with their own rounded values, so the error is the metric's own).

DESIGN.md targets for lossplug on CPU: no slower than torchmetrics, at most a quarter of its
extra memory, and a relative error of at most 1e-5 on bf16 logits.

Usage::

    python benchmarks/metrics.py                # full run (about a minute on 2 cores)
    python benchmarks/metrics.py --quick        # tiny shapes, smoke test (seconds)
    python benchmarks/metrics.py --repeats 21 --only "4x512x32000 fp32" --json metrics.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import _harness as H
import torch
from _harness import IGNORE

PRELOAD = ["torch", "torchmetrics.text", "lossplug", "lossplug.metrics"]

IMPLS = ("lossplug", "torchmetrics")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IGNORED_SHARE = 0.10
# DESIGN.md targets: lossplug ÷ torchmetrics time and extra memory, relative error on bf16
TARGET_TIME = 1.0
TARGET_MEMORY = 0.25
TARGET_BF16_ERR = 1e-5


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    impl: str
    shape: tuple[int, int, int]  # batch, sequence, vocabulary
    dtype: str  # key of DTYPES
    threads: int
    seed: int = 0


@dataclass(frozen=True)
class Group:
    """Both metrics on the same inputs, their calls interleaved."""

    shape: tuple[int, int, int]
    dtype: str
    impls: tuple[str, ...]
    repeats: int
    threads: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype}"

    def case(self, impl: str) -> Case:
        return Case(impl, self.shape, self.dtype, self.threads, self.seed)


def make_inputs(
    shape: tuple[int, int, int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, S, V]`` (built a few rows at a time) and targets ``[B, S]``.

    About :data:`IGNORED_SHARE` of the targets, drawn at random, are ``-100``; every row's logit of
    its target token gets a random bump, so that the perplexity is a plausible ~10-1000.
    """
    batch, seq, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    ignored = torch.rand(batch, seq, generator=gen) < IGNORED_SHARE
    logits = torch.empty(shape, dtype=dtype)
    H.fill_logits(logits, tokens, gen)
    return logits, tokens.masked_fill(ignored, IGNORE)


def build_call(case: Case, logits: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
    """A zero-argument callable: ``reset``, ``update(logits, target)``, ``compute``."""
    if case.impl == "lossplug":
        import lossplug.metrics

        metric = lossplug.metrics.Perplexity(ignore_index=IGNORE)
    elif case.impl == "torchmetrics":
        import torchmetrics.text

        metric = torchmetrics.text.Perplexity(ignore_index=IGNORE)
    else:
        raise ValueError(case.impl)

    def call() -> torch.Tensor:
        with torch.no_grad():
            metric.reset()
            metric.update(logits, target)
            return metric.compute()

    return call


def measure_memory(case: Case, parent_pid: int) -> H.Result:
    """Child-process body: peak extra memory of one cold call, and its error vs float64."""
    H.child_setup(parent_pid, case.threads)
    result = H.Result(case)
    try:
        # a tiny run first: thread pools, lazy imports and dispatch caches get set up
        build_call(case, *make_inputs((2, 16, 64), DTYPES[case.dtype], case.seed))()
        logits, target = make_inputs(case.shape, DTYPES[case.dtype], case.seed)
        call = build_call(case, logits, target)
        result.ppl = float(H.cold_call(call, result))
        result.ppl_ref, _ = H.reference(logits, target)
    except Exception:  # reported in the table instead of ending the whole run
        result.error = H.last_error_line()
    return result


def measure_times(group: Group, parent_pid: int) -> dict[str, Any]:
    """Child-process body: interleaved timed calls of both metrics on one input."""
    H.child_setup(parent_pid, group.threads)
    logits, target = make_inputs(group.shape, DTYPES[group.dtype], group.seed)
    builders = {impl: partial(build_call, group.case(impl), logits, target) for impl in group.impls}
    return H.time_interleaved(builders, group.repeats)


def _verdict(value: float | None, limit: float, digits: int) -> str:
    """``met`` / ``at the limit`` / ``**missed**`` for ``value ≤ limit``, judged at the precision
    the table shows (a ratio printed as 1.00x is neither a win nor a loss)."""
    if value is None:
        return "n/a"
    shown = round(value, digits)
    if shown < limit:
        return "met"
    return "at the limit" if shown == limit else "**missed**"


def format_tables(results: list[H.Result]) -> str:
    """The side-by-side table, then each lossplug row against the DESIGN.md targets."""
    by_key = {(r.case.shape, r.case.dtype, r.case.impl): r for r in results}
    head = [
        "shape",
        "dtype",
        "impl",
        "median ms",
        "extra MiB",
        "perplexity",
        "ppl rel err",
        "lossplug time ratio",
        "lossplug mem ratio",
        "bg CPU",
    ]
    table, checks = [], []
    for (shape, dtype, impl), res in by_key.items():
        ours = by_key.get((shape, dtype, "lossplug"))
        cells = ["x".join(map(str, shape)), dtype, impl if impl == "lossplug" else f"  {impl}"]
        if res.error:
            table.append([*cells, f"error: {res.error}"])
            continue
        cells += [H.ms(res), H.mib(res.extra_bytes), H.fmt(res.ppl, ".4f")]
        cells.append(H.fmt(res.ppl_rel_err, ".1e"))
        if impl == "lossplug" or ours is None or ours.error:
            cells += ["—", "—"]
        else:
            cells += [
                H.ratio(ours.median_s, res.median_s),
                H.ratio(ours.extra_bytes, res.extra_bytes),
            ]
            checks.append(_check_row(ours, res))
        cells.append(H.fmt(H.pct(res.background_cpu), ".0f") + "%")
        table.append(cells)
    lines = ["", "### Perplexity: reset + update(logits, target) + compute", ""]
    lines += H.markdown_table(head, table)
    if checks:
        lines += [
            "",
            f"### lossplug against the targets (time ≤ {TARGET_TIME:g}× torchmetrics, extra "
            f"memory ≤ {TARGET_MEMORY:g}×, relative error ≤ {TARGET_BF16_ERR:g} on bf16)",
            "",
        ]
        lines += H.markdown_table(
            ["shape", "dtype", "time ratio", "time", "mem ratio", "memory", "rel err", "error"],
            checks,
        )
    return "\n".join(lines)


def _check_row(ours: H.Result, theirs: H.Result) -> list[str]:
    time_ratio = mem_ratio = None
    if ours.median_s is not None and theirs.median_s:
        time_ratio = ours.median_s / theirs.median_s
    if ours.extra_bytes is not None and theirs.extra_bytes:
        mem_ratio = ours.extra_bytes / theirs.extra_bytes
    err = ours.ppl_rel_err  # exactness is the bf16 target; fp32 is held to the same bound
    return [
        "x".join(map(str, ours.case.shape)),
        ours.case.dtype,
        H.ratio(ours.median_s, theirs.median_s),
        _verdict(time_ratio, TARGET_TIME, 2),
        H.ratio(ours.extra_bytes, theirs.extra_bytes),
        _verdict(mem_ratio, TARGET_MEMORY, 2),
        H.fmt(err, ".1e"),
        _verdict(None if err is None else err / TARGET_BF16_ERR, 1.0, 1),
    ]


def plan(args: argparse.Namespace) -> list[Group]:
    shapes = [(2, 64, 1000)] if args.quick else [(4, 512, 32000), (2, 1024, 50257)]
    groups = []
    for shape in shapes:
        for dtype in DTYPES:
            groups.append(Group(shape, dtype, IMPLS, args.repeats, args.threads))
    if args.only:
        groups = [g for g in groups if any(text in g.label for text in args.only)]
    return groups


def _method(args: argparse.Namespace, groups: list[Group], policy: dict[str, Any]) -> str:
    n_cases = sum(len(g.impls) for g in groups)
    return (
        f"{n_cases} cases; targets ~{IGNORED_SHARE:.0%} ignored (-100); peak extra memory and "
        f"error from one cold call, each case in its own process; time = median of "
        f"{args.repeats} calls per case, both metrics interleaved in one process per group "
        f"after a warm-up call each; {H.describe_policy(policy)}"
    )


def _progress(res: H.Result) -> str:
    shape = "x".join(map(str, res.case.shape))
    return H.progress_line(res, f"{shape:>14s} {res.case.dtype} {res.case.impl:12s}")


SPEC = H.BenchmarkSpec(
    title="lossplug Perplexity CPU",
    description=__doc__.splitlines()[0],
    preload=PRELOAD,
    repeats=11,
    only_example="4x512x32000 fp32",
    plan=lambda args, _workdir: plan(args),
    measure_memory=measure_memory,
    measure_times=measure_times,
    method=_method,
    progress=_progress,
    notes=(
        "- ratios are lossplug ÷ torchmetrics (below 1 = lossplug faster / leaner); extra MiB = "
        "peak RSS above the inputs; ppl rel err against float64 on the same (rounded) values; "
        "bg CPU = share of all cores used by other processes while the group was timed",
    ),
    report=lambda results, _groups: format_tables(results),
    pairs=lambda group: {"lossplug": ("torchmetrics",)},
    anchor_name="torchmetrics",
)


def main(argv: list[str] | None = None) -> int:
    return H.run_benchmark(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
