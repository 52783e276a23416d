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
(``_harness/``).

Usage::

    python benchmarks/cross_entropy.py              # full run
    python benchmarks/cross_entropy.py --quick      # tiny shapes, smoke test
    python benchmarks/cross_entropy.py --repeats 9 --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE

EVAL_IMPLS = ("lossplug", "torchmetrics", "F.cross_entropy")
COMPILED = "torch.compile(F.cross_entropy)"
TRAIN_IMPLS = ("lossplug", "F.cross_entropy", COMPILED, "lossplug shift=True", "HF shift pattern")
# lossplug row -> the anchors it is compared with
PAIRS = {
    "eval": {"lossplug": ("torchmetrics", "F.cross_entropy")},
    "train": {
        "lossplug": ("F.cross_entropy", COMPILED),
        "lossplug shift=True": ("HF shift pattern",),
    },
}


@dataclass(frozen=True, kw_only=True)
class Case(H.Case):
    """:class:`_harness.Case` plus the job: ``"eval"`` or ``"train"``."""

    task: str


@dataclass
class Result(H.Result):
    """:class:`_harness.Result` plus the gradient of a training case."""

    grad_bytes: int | None = None
    grad_err: float | None = None
    compile_s: float | None = None  # torch.compile's first call (tracing and code generation)


# ----------------------------------------------------------------------------------------------
# inputs


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[B, S, V]`` and both label layouts, built a few rows at a time.

    Returns ``(logits, target, labels)``: ``target[b, t]`` is the token position ``t`` predicts
    (for the unshifted call), ``labels`` the Hugging Face layout with ``labels[b, t + 1] ==
    target[b, t]``. The first sixteenth of each sequence is masked with ``ignore_index`` as in
    supervised fine-tuning (prompt tokens). Each row's logit of its next token gets a random bump
    so that the perplexity is a plausible ~10-1000 instead of ~V. The logits of a training case
    require a gradient.
    """
    batch, seq, vocab = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    nxt = tokens[:, 1:].contiguous()
    logits = torch.empty(case.shape, dtype=case.torch_dtype)
    H.fill_logits(logits, nxt, gen)
    prompt = max(1, seq // 16)
    target = nxt.clone()
    target[:, :prompt] = IGNORE
    labels = tokens[:, :seq].clone()
    labels[:, : prompt + 1] = IGNORE
    return logits.requires_grad_(case.task == "train"), target, labels


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
        by_key = {(r.case.shape_text, r.case.dtype, r.case.impl): r for r in rows}
        table = []
        for (shape, dtype, impl), res in by_key.items():
            ours = None
            for mine, anchors in PAIRS[task].items():
                if impl in anchors:
                    ours = by_key.get((shape, dtype, mine))
            cells = [shape, dtype, impl if ours is None else f"  {impl}"]
            if res.error:
                table.append([*cells, f"error: {res.error}"])
                continue
            cells += [H.ms(res), H.mib(res.extra_bytes)]
            if task == "train":
                cells += [H.ratio(res.extra_bytes, res.grad_bytes), H.fmt(res.grad_err, ".1e")]
            cells += [H.fmt(res.ppl_rel_err, ".1e"), *H.anchor_ratios(ours, res)]
            table.append([*cells, H.pct(res.background_cpu)])
            if res.compile_s is not None:
                compile_notes.append(f"- {impl} {shape} {dtype}: compiled in {res.compile_s:.1f} s")
        lines += ["", f"### {title}", "", *H.markdown_table(head, table)]
    if compile_notes:
        lines += ["", "Compile time (first call, not in the medians):", "", *compile_notes]
    return "\n".join(lines)


class CrossEntropyBenchmark(H.Benchmark):
    title = "lossplug cross_entropy CPU"
    description = __doc__.splitlines()[0]
    preload = ("torch", "torch.nn.functional", "torchmetrics.text", "lossplug")
    only_example = "train 8x1024x32000 fp32"
    contention_note = "; no memory measured"
    result_type = Result
    notes = (
        H.legend(
            "anchor",
            "extra MiB = peak RSS above the inputs",
            "grad err = max|g - g_ref| / max|g_ref|",
            "ppl rel err against float64 on the same (rounded) values",
        ),
    )

    inputs = staticmethod(make_inputs)
    build_call = staticmethod(build_call)

    def measure(self, case: Case, result: Result) -> None:
        # a tiny run first: thread pools, lazy imports and dispatch caches get set up
        build_call(case, *make_inputs(dataclasses.replace(case, shape=(2, 16, 64))))()
        logits, target, labels = make_inputs(case)
        call = build_call(case, logits, target, labels)
        if case.impl == COMPILED:
            # compile apart (its memory is the compiler's, not the loss's), then measure
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

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--skip-large", action="store_true", help="leave out the [8, 1024, 32000] training case"
        )

    def plan(self, args: argparse.Namespace, workdir: str) -> list[H.Group]:
        """The groups to run: each lossplug impl with the anchors it is compared with."""
        shapes = [(2, 64, 1000)] if args.quick else [(4, 512, 32000), (2, 1024, 50257)]
        large = [] if args.quick or args.skip_large else [(8, 1024, 32000)]
        groups = []
        for task, impls, task_shapes in (
            ("eval", EVAL_IMPLS, shapes),
            ("train", TRAIN_IMPLS, shapes + large),
        ):
            for shape in task_shapes:
                for dtype in H.DTYPES:
                    setup = Case(task=task, shape=shape, dtype=dtype, threads=args.threads)
                    label = f"{task} {setup.shape_text} {dtype}"
                    groups.append(H.Group(label, setup, impls, args.repeats))
        return groups

    def report(self, results: list[Result], groups: list[H.Group]) -> str:
        return format_tables(results)

    def pairs(self, group: H.Group) -> dict[str, tuple[str, ...]]:
        return PAIRS[group.setup.task]

    def progress(self, res: Result) -> str:
        case = res.case
        label = f"{case.task:5s} {case.shape_text:>14s} {case.dtype} {case.impl:22s}"
        return H.progress_line(res, label)


if __name__ == "__main__":
    sys.exit(CrossEntropyBenchmark().main())
