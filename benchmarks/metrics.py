"""CPU benchmark of ``lossplug.metrics.Perplexity`` against ``torchmetrics.text.Perplexity``.

Both metrics get the same logits ``[B, S, V]`` (fp32 or bf16) and targets of which about 10% are
``-100`` (ignored), and run ``reset()``, ``update(logits, target)`` and ``compute()`` under
``torch.no_grad()``. Measured per case, with the machinery of ``cross_entropy.py`` (in
``_harness/``): peak extra memory of one cold call in a child process of its own, the median
time of ``--repeats`` calls made round-robin with the other metric in one process, and the
perplexity's relative error against a float64 reference computed on the very values the metric
saw (bf16 logits are compared with their own rounded values, so the error is the metric's own).

DESIGN.md targets for lossplug on CPU: no slower than torchmetrics, at most a quarter of its
extra memory, and a relative error of at most 1e-5 on bf16 logits.

Usage::

    python benchmarks/metrics.py                # full run
    python benchmarks/metrics.py --quick        # tiny shapes, smoke test
    python benchmarks/metrics.py --repeats 21 --only "4x512x32000 fp32" --json metrics.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import _harness as H
import torch
from _harness import IGNORE

IGNORED_SHARE = 0.10
# DESIGN.md targets: lossplug ÷ torchmetrics time and extra memory, relative error on bf16
TARGET_TIME = 1.0
TARGET_MEMORY = 0.25
TARGET_BF16_ERR = 1e-5


def make_inputs(case: H.Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, S, V]`` (built a few rows at a time) and targets ``[B, S]``.

    About :data:`IGNORED_SHARE` of the targets, drawn at random, are ``-100``; every row's logit of
    its target token gets a random bump, so that the perplexity is a plausible ~10-1000.
    """
    batch, seq, vocab = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    ignored = torch.rand(batch, seq, generator=gen) < IGNORED_SHARE
    logits = torch.empty(case.shape, dtype=case.torch_dtype)
    H.fill_logits(logits, tokens, gen)
    return logits, tokens.masked_fill(ignored, IGNORE)


def build_call(case: H.Case, logits: torch.Tensor, target: torch.Tensor) -> Callable[[], Any]:
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


def format_tables(results: list[H.Result]) -> str:
    """The side-by-side table, then each lossplug row against the DESIGN.md targets."""
    by_key = {(r.case.shape_text, r.case.dtype, r.case.impl): r for r in results}
    head = ["shape", "dtype", "impl", "median ms", "extra MiB", "perplexity", "ppl rel err"]
    head += ["lossplug time ratio", "lossplug mem ratio", "bg CPU"]
    table, checks = [], []
    for (shape, dtype, impl), res in by_key.items():
        ours = by_key.get((shape, dtype, "lossplug"))
        cells = [shape, dtype, impl if impl == "lossplug" else f"  {impl}"]
        if res.error:
            table.append([*cells, f"error: {res.error}"])
            continue
        cells += [H.ms(res), H.mib(res.extra_bytes), H.fmt(res.ppl, ".4f")]
        cells += [H.fmt(res.ppl_rel_err, ".1e"), *H.anchor_ratios(ours, res)]
        table.append([*cells, H.pct(res.background_cpu)])
        if ours is not None and ours is not res and not ours.error:
            checks.append(_check_row(ours, res))
    lines = ["", "### Perplexity: reset + update(logits, target) + compute", ""]
    lines += H.markdown_table(head, table)
    if checks:
        lines += [
            "",
            f"### lossplug against the targets (time ≤ {TARGET_TIME:g}× torchmetrics, extra "
            f"memory ≤ {TARGET_MEMORY:g}×, relative error ≤ {TARGET_BF16_ERR:g} on bf16)",
            "",
        ]
        head = ["shape", "dtype", "time ratio", "time", "mem ratio", "memory", "rel err", "error"]
        lines += H.markdown_table(head, checks)
    return "\n".join(lines)


def _check_row(ours: H.Result, theirs: H.Result) -> list[str]:
    time_ratio = mem_ratio = None
    if ours.median_s is not None and theirs.median_s:
        time_ratio = ours.median_s / theirs.median_s
    if ours.extra_bytes is not None and theirs.extra_bytes:
        mem_ratio = ours.extra_bytes / theirs.extra_bytes
    err = ours.ppl_rel_err  # exactness is the bf16 target; fp32 is held to the same bound
    return [
        ours.case.shape_text,
        ours.case.dtype,
        H.ratio(ours.median_s, theirs.median_s),
        H.verdict(time_ratio, TARGET_TIME),
        H.ratio(ours.extra_bytes, theirs.extra_bytes),
        H.verdict(mem_ratio, TARGET_MEMORY),
        H.fmt(err, ".1e"),
        H.verdict(None if err is None else err / TARGET_BF16_ERR, 1.0, digits=1),
    ]


class PerplexityBenchmark(H.Benchmark):
    title = "lossplug Perplexity CPU"
    description = __doc__.splitlines()[0]
    preload = ("torch", "torchmetrics.text", "lossplug", "lossplug.metrics")
    repeats = 11
    only_example = "4x512x32000 fp32"
    anchor_name = "torchmetrics"
    job = f"targets ~{IGNORED_SHARE:.0%} ignored (-100); "
    interleaved = "both metrics"
    notes = (
        H.legend(
            "torchmetrics",
            "extra MiB = peak RSS above the inputs",
            "ppl rel err against float64 on the same (rounded) values",
        ),
    )

    inputs = staticmethod(make_inputs)
    build_call = staticmethod(build_call)

    def measure(self, case: H.Case, result: H.Result) -> None:
        # a tiny run first: thread pools, lazy imports and dispatch caches get set up
        build_call(case, *make_inputs(dataclasses.replace(case, shape=(2, 16, 64))))()
        logits, target = make_inputs(case)
        result.ppl = float(H.cold_call(build_call(case, logits, target), result))
        result.ppl_ref, _ = H.reference(logits, target)

    def plan(self, args: argparse.Namespace, workdir: str) -> list[H.Group]:
        shapes = [(2, 64, 1000)] if args.quick else [(4, 512, 32000), (2, 1024, 50257)]
        groups = []
        for shape in shapes:
            for dtype in H.DTYPES:
                setup = H.Case(shape=shape, dtype=dtype, threads=args.threads)
                label = f"{setup.shape_text} {dtype}"
                groups.append(H.Group(label, setup, ("lossplug", "torchmetrics"), args.repeats))
        return groups

    def report(self, results: list[H.Result], groups: list[H.Group]) -> str:
        return format_tables(results)

    def progress(self, res: H.Result) -> str:
        case = res.case
        return H.progress_line(res, f"{case.shape_text:>14s} {case.dtype} {case.impl:12s}")


if __name__ == "__main__":
    sys.exit(PerplexityBenchmark().main())
