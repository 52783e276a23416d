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
group, so load from other processes hits all of them alike; that load is reported too. The
measuring machinery and the command line are shared with the other CPU benchmarks
(``_harness.py``).

Usage::

    python benchmarks/cross_entropy.py              # full run (a few minutes on 2 cores)
    python benchmarks/cross_entropy.py --quick      # tiny shapes, smoke test
    python benchmarks/cross_entropy.py --repeats 9 --json results.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE

PRELOAD = ["torch", "torch.nn.functional", "torchmetrics.text", "lossplug"]

EVAL_IMPLS = ("lossplug", "torchmetrics", "F.cross_entropy")
COMPILED = "torch.compile(F.cross_entropy)"
TRAIN_IMPLS = (
    "lossplug",
    "F.cross_entropy",
    COMPILED,
    "lossplug shift=True",
    "HF shift pattern",
)
# lossplug row -> the anchors it is compared with
PAIRS = {
    "eval": {"lossplug": ("torchmetrics", "F.cross_entropy")},
    "train": {
        "lossplug": ("F.cross_entropy", COMPILED),
        "lossplug shift=True": ("HF shift pattern",),
    },
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
class Result(H.Result):
    """:class:`_harness.Result` plus the gradient of a training case."""

    grad_bytes: int | None = None
    grad_err: float | None = None
    compile_s: float | None = None  # torch.compile's first call (tracing and code generation)


# ----------------------------------------------------------------------------------------------
# inputs


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
    H.fill_logits(logits, nxt, gen)
    prompt = max(1, seq // 16)
    target = nxt.clone()
    target[:, :prompt] = IGNORE
    labels = tokens[:, :seq].clone()
    labels[:, : prompt + 1] = IGNORE
    return logits, target, labels


def shifted_target(labels: torch.Tensor) -> torch.Tensor:
    """Per-position target of the shift pattern: ``labels[t + 1]``, the last position ignored."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)


# ----------------------------------------------------------------------------------------------
# the measured calls (child-process bodies)


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

    elif case.impl == COMPILED:
        compiled = torch.compile(F.cross_entropy)

        def loss_fn() -> torch.Tensor:
            x = logits.float() if upcast else logits
            return compiled(x.view(-1, vocab), target.view(-1))

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


def _warm_up(case: Case) -> None:
    """A tiny run of the same call: thread pools, lazy imports and dispatch caches get set up."""
    small = make_inputs((2, 16, 64), DTYPES[case.dtype], case.seed)
    small[0].requires_grad_(case.task == "train")
    build_call(case, *small)()


def measure_memory(case: Case, parent_pid: int) -> Result:
    """Child-process body: peak extra memory of one cold call, and its error vs float64."""
    H.child_setup(parent_pid, case.threads)
    result = Result(case)
    try:
        _warm_up(case)
        logits, target, labels = make_inputs(case.shape, DTYPES[case.dtype], case.seed)
        logits.requires_grad_(case.task == "train")
        call = build_call(case, logits, target, labels)
        if case.impl == COMPILED:
            # compile apart (its memory is the compiler's, not the loss's), then measure a call
            t0 = time.perf_counter()
            call()
            result.compile_s = time.perf_counter() - t0
            logits.grad = None
        # the cold call: nothing of it is cached anywhere yet
        result.ppl = float(H.cold_call(call, result))

        grad = logits.grad if case.task == "train" else None
        if grad is not None:
            result.grad_bytes = grad.numel() * grad.element_size()
        shifted = case.impl in ("lossplug shift=True", "HF shift pattern")
        per_row = shifted_target(labels) if shifted else target
        result.ppl_ref, result.grad_err = H.reference(logits.detach(), per_row, grad)
    except Exception:  # reported in the table instead of ending the whole run
        result.error = H.last_error_line()
    return result


def measure_times(group: Group, parent_pid: int) -> dict[str, Any]:
    """Child-process body: interleaved timed calls of every impl of ``group`` on one input."""
    H.child_setup(parent_pid, group.threads)
    logits, target, labels = make_inputs(group.shape, DTYPES[group.dtype], group.seed)
    logits.requires_grad_(group.task == "train")
    builders = {
        impl: partial(build_call, group.case(impl), logits, target, labels) for impl in group.impls
    }

    def drop_grad() -> None:
        logits.grad = None

    return H.time_interleaved(builders, group.repeats, after_each=drop_grad)


# ----------------------------------------------------------------------------------------------
# report


def format_tables(results: list[Result]) -> str:
    """Markdown tables: each lossplug row, then its anchors with lossplug ÷ anchor ratios."""
    lines: list[str] = []
    compile_notes: list[str] = []
    for task, title in (
        ("eval", "Perplexity / eval, forward only under torch.no_grad()"),
        ("train", "Training loss, forward + backward"),
    ):
        rows = [r for r in results if r.case.task == task]
        if not rows:
            continue
        head = ["shape", "dtype", "impl", "median ms", "extra MiB"]
        if task == "train":
            head += ["extra / grad buf", "grad err"]
        head += ["ppl rel err", "lossplug time ratio", "lossplug mem ratio", "bg CPU"]
        by_key = {(r.case.shape, r.case.dtype, r.case.impl): r for r in rows}
        table = []
        for (shape, dtype, impl), res in by_key.items():
            ours = None
            for mine, anchors in PAIRS[task].items():
                if impl in anchors:
                    ours = by_key.get((shape, dtype, mine))
            cells = ["x".join(map(str, shape)), dtype, impl if ours is None else f"  {impl}"]
            if res.error:
                table.append([*cells, f"error: {res.error}"])
                continue
            extra = res.extra_bytes
            cells += [H.ms(res), H.mib(extra)]
            if task == "train":
                cells += [H.ratio(extra, res.grad_bytes), H.fmt(res.grad_err, ".1e")]
            cells.append(H.fmt(res.ppl_rel_err, ".1e"))
            if ours is None or ours.error:
                cells += ["—", "—"]
            else:
                cells += [H.ratio(ours.median_s, res.median_s), H.ratio(ours.extra_bytes, extra)]
            cells.append(H.fmt(H.pct(res.background_cpu), ".0f") + "%")
            table.append(cells)
            if res.compile_s is not None:
                compile_notes.append(
                    f"- {impl} {cells[0]} {dtype}: compiled in {res.compile_s:.1f} s"
                )
        lines += ["", f"### {title}", "", *H.markdown_table(head, table)]
    if compile_notes:
        lines += ["", "Compile time (first call, not in the medians):", "", *compile_notes]
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


def _method(args: argparse.Namespace, groups: list[Group], policy: dict[str, Any]) -> str:
    n_cases = sum(len(g.impls) for g in groups)
    return (
        f"{n_cases} cases; peak extra memory and error from one cold call, each case in its own "
        f"process; time = median of {args.repeats} calls per case, lossplug and its anchors "
        f"interleaved in one process per group after a warm-up call each; "
        f"{H.describe_policy(policy)}"
    )


def _progress(res: H.Result) -> str:
    case = res.case
    shape = "x".join(map(str, case.shape))
    return H.progress_line(res, f"{case.task:5s} {shape:>14s} {case.dtype} {case.impl:22s}")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-large", action="store_true", help="leave out the [8, 1024, 32000] training case"
    )


SPEC = H.BenchmarkSpec(
    title="lossplug cross_entropy CPU",
    description=__doc__.splitlines()[0],
    preload=PRELOAD,
    repeats=5,
    only_example="train 8x1024x32000 fp32",
    plan=lambda args, _workdir: plan(args),
    measure_memory=measure_memory,
    measure_times=measure_times,
    method=_method,
    progress=_progress,
    notes=(
        "- ratios are lossplug ÷ anchor (below 1 = lossplug faster / leaner); "
        "extra MiB = peak RSS above the inputs; grad err = max|g - g_ref| / max|g_ref|; "
        "ppl rel err against float64 on the same (rounded) values; bg CPU = share of all "
        "cores used by other processes while the group was timed",
    ),
    report=lambda results, _groups: format_tables(results),
    pairs=lambda group: PAIRS[group.task],
    make_result=Result,
    contention_note="; no memory measured",
    add_arguments=_add_arguments,
)


def main(argv: list[str] | None = None) -> int:
    return H.run_benchmark(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
