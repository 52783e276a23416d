"""CPU benchmark of ``lossplug.linear_cross_entropy`` (torch backend) against its anchors.

The job is a training step of the loss of a linear head, forward + backward with respect to both
the hidden states ``h [N, D]`` and the head's weight ``W [V, D]`` (both ``requires_grad``),
reduction ``"mean"``. Side by side on the same inputs:

* ``lossplug``: ``lossplug.linear_cross_entropy(h, W, y, backend="torch")``;
* ``materialised``: ``F.cross_entropy(h @ W.T, y)``, the ``[N, V]`` logits in memory (bf16
  logits upcast with ``.float()`` first, as users and Hugging Face's loss do);
* ``F.linear_cross_entropy (reference)``: ``torch.nn.functional.linear_cross_entropy(h, W, y)``
  with ``options=None`` (its default: the reference path, which materialises);
* ``F.linear_cross_entropy (chunked)``: the same with ``options=LinearCrossEntropyOptions()``
  (its ``"auto"`` chunking and accumulation policy);
* ``F.linear_cross_entropy (best)``: the fastest explicit ``LinearCrossEntropyOptions`` found
  on this machine with ``--explore`` (:data:`BEST_OPTIONS`, named in the table);
* ``CCE torch.compile``: Cut Cross-Entropy's ``linear_cross_entropy(e, c, targets,
  impl="torch_compile")`` when ``cut_cross_entropy`` imports (n/a otherwise).

Three groups: the DESIGN.md target (fp32, N = 4096 as 8 sequences of 512, D = 512, V = 32000,
no ignored token), the same with the first quarter of each sequence ignored (``-100``, prompt
tokens: lossplug drops them before any matmul on CPU), and a Llama-3-sized head (bf16, N = 2048,
D = 1024, V = 128256).

Peak extra memory (resident set size above the inputs, the gradients of ``h`` and ``W``
included) comes from one cold call of each case in its own child process (``_harness.py``); the
same call gives the loss error and the largest gradient error against a float64 reference
(materialised float64 logits, computed once per group in a child of its own from the very values
the cases saw: bf16 inputs are compared with their own rounded values). Times are the median of
``--repeats`` calls, lossplug and its anchors interleaved round-robin in one child process per
group, so load from other processes hits all of them alike; that load is reported too.

Usage::

    python benchmarks/linear_cross_entropy.py              # full run (~10 minutes on 2 cores)
    python benchmarks/linear_cross_entropy.py --quick      # tiny shapes, smoke test
    python benchmarks/linear_cross_entropy.py --only main --repeats 9 --json lce.json
    python benchmarks/linear_cross_entropy.py --explore    # LinearCrossEntropyOptions sweep
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE, MiB

from _reference import max_rel_err, reference_linear_cross_entropy_rows

PRELOAD = ["torch", "torch.nn.functional", "lossplug"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

LOSSPLUG = "lossplug"
MATERIALISED = "materialised"
FLCE_REFERENCE = "F.linear_cross_entropy (reference)"
FLCE_CHUNKED = "F.linear_cross_entropy (chunked)"
FLCE_BEST = "F.linear_cross_entropy (best)"
CCE = "CCE torch.compile"
MAIN_IMPLS = (LOSSPLUG, MATERIALISED, FLCE_REFERENCE, FLCE_CHUNKED, FLCE_BEST, CCE)
# the reference path is the materialised loss again: left out where time is short
OTHER_IMPLS = (LOSSPLUG, MATERIALISED, FLCE_CHUNKED, FLCE_BEST, CCE)

#: The fastest explicit ``LinearCrossEntropyOptions`` of ``--explore`` on this machine (2026-11-27,
#: see RESULTS.md), per input dtype. fp32: 1024-row chunks, default ``"compact"`` policy (2.42 s,
#: +211 MiB; 2048 rows as fast and heavier, 512 rows 6% slower and 60 MiB leaner); bf16: 512-row
#: chunks with the ``"accurate"`` policy (4.74 s; 256 and 1024 rows within 4%).
BEST_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"chunking_method": None, "batch_chunk_size": 1024},
    "bf16": {"chunking_method": None, "batch_chunk_size": 512, "acc_policy": "accurate"},
}
#: The settings ``--explore`` times against each other (and lossplug), per dtype.
EXPLORE_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "fp32": [
        {},
        {"chunking_method": "aspect_ratio"},
        *(
            {"chunking_method": None, "batch_chunk_size": rows}
            for rows in (128, 256, 512, 1024, 2048)
        ),
        {"chunking_method": None, "batch_chunk_size": 512, "acc_policy": "balanced"},
        {"chunking_method": None, "batch_chunk_size": 512, "acc_policy": "accurate"},
    ],
    "bf16": [
        *(
            {"chunking_method": None, "batch_chunk_size": rows, "acc_policy": "accurate"}
            for rows in (128, 256, 512, 1024)
        ),
        {"chunking_method": None, "batch_chunk_size": 256, "acc_policy": "balanced"},
    ],
}
EXPLORE_PREFIX = "F.lce "

# DESIGN.md target for the main group: lossplug's time ≤ 1.0× the fastest anchor's, its extra
# memory ≤ 0.5× the leanest anchor's
TARGET_TIME = 1.0
TARGET_MEMORY = 0.5
DESIGN_ANCHORS = (
    "DESIGN.md (another machine): materialised 2.09 s, +1.5 GiB; F.linear_cross_entropy best "
    "setting 1.64 s, +311 MiB, default +1.5 GiB; CCE torch.compile 1.64 s, +588 MiB"
)


def describe_options(options: dict[str, Any]) -> str:
    """``LinearCrossEntropyOptions`` keywords as a table cell (``auto`` when empty)."""
    if not options:
        return "auto"
    shown = {
        k: v
        for k, v in options.items()
        if not (k == "chunking_method" and v is None) and not (k == "batch_chunk_size" and not v)
    }
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def explore_impl(options: dict[str, Any]) -> str:
    return EXPLORE_PREFIX + describe_options(options)


def flce_options(impl: str, dtype: str) -> Any:
    """The ``LinearCrossEntropyOptions`` of an ``F.linear_cross_entropy`` impl (None: reference)."""
    if impl == FLCE_REFERENCE:
        return None
    if impl == FLCE_CHUNKED:
        return torch.nn.LinearCrossEntropyOptions()
    if impl == FLCE_BEST:
        return torch.nn.LinearCrossEntropyOptions(**BEST_OPTIONS[dtype])
    for options in EXPLORE_OPTIONS[dtype]:
        if impl == explore_impl(options):
            return torch.nn.LinearCrossEntropyOptions(**options)
    raise ValueError(impl)


def display_name(impl: str, dtype: str) -> str:
    if impl == FLCE_BEST:
        return f"F.linear_cross_entropy (best: {describe_options(BEST_OPTIONS[dtype])})"
    return impl


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    impl: str
    shape: tuple[int, int, int, int]  # sequences, sequence length, hidden size D, vocabulary V
    dtype: str  # key of DTYPES
    prompt_share: float  # share of each sequence's first targets set to -100
    threads: int
    ref_path: str  # where the group's float64 reference is saved
    seed: int = 0


@dataclass(frozen=True)
class Group:
    """The cases timed together, on the same inputs, calls interleaved."""

    name: str
    shape: tuple[int, int, int, int]
    dtype: str
    prompt_share: float
    impls: tuple[str, ...]
    repeats: int
    threads: int
    ref_path: str
    untimed: tuple[str, ...] = ()  # measured by their cold call only (too slow to repeat)
    seed: int = 0

    @property
    def label(self) -> str:
        batch, seq, dim, vocab = self.shape
        return f"{self.name}: N={batch * seq} D={dim} V={vocab} {self.dtype}"

    def case(self, impl: str) -> Case:
        return Case(
            impl,
            self.shape,
            self.dtype,
            self.prompt_share,
            self.threads,
            self.ref_path,
            self.seed,
        )


@dataclass
class Result(H.Result):
    """:class:`_harness.Result` plus the loss, gradient errors and cold-call time of a case."""

    loss: float | None = None
    loss_ref: float | None = None
    grad_err_h: float | None = None
    grad_err_w: float | None = None
    grad_bytes: int | None = None
    cold_s: float | None = None
    note: str = ""

    @property
    def loss_rel_err(self) -> float | None:
        if self.loss is None or self.loss_ref is None:
            return None
        return abs(self.loss - self.loss_ref) / abs(self.loss_ref)

    @property
    def grad_err(self) -> float | None:
        errs = [e for e in (self.grad_err_h, self.grad_err_w) if e is not None]
        return max(errs) if errs else None


# ----------------------------------------------------------------------------------------------
# inputs and the float64 reference


def make_inputs(
    shape: tuple[int, int, int, int], dtype: torch.dtype, prompt_share: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h [N, D]``, ``W [V, D]`` and ``y [N]``, built a few rows at a time.

    ``W`` is ``2 randn / sqrt(D)`` (logits of standard deviation about 2, as in the other
    benchmarks); each row of ``h`` is ``randn`` plus a random multiple in ``[0, 14)`` of
    ``W[y] / |W[y]|²``, which bumps the logit of its target by that much, so the loss is a
    plausible ~5-6 nats instead of ``log V``. The first ``prompt_share`` of each of the
    ``shape[0]`` sequences is ignored (``-100``), as prompt tokens in supervised fine-tuning.
    """
    batch, seq, dim, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(vocab, dim, dtype=dtype)
    rows = max(1, (8 * MiB) // (4 * dim))
    for start in range(0, vocab, rows):
        stop = min(start + rows, vocab)
        weight[start:stop].copy_(torch.randn(stop - start, dim, generator=gen).mul_(2 / dim**0.5))
    n = batch * seq
    target = torch.randint(0, vocab, (n,), generator=gen)
    w_true = weight.index_select(0, target).float()  # the rounded values the op will see
    bump = torch.rand(n, generator=gen).mul_(14.0)
    hidden32 = torch.randn(n, dim, generator=gen)
    hidden32.addcmul_(w_true, (bump / w_true.square().sum(dim=1))[:, None])
    hidden = hidden32.to(dtype)
    del w_true, hidden32
    prompt = round(seq * prompt_share)
    if prompt:
        target.view(batch, seq)[:, :prompt] = IGNORE
    return hidden, weight, target


def compute_reference(group: Group, parent_pid: int) -> dict[str, float]:
    """Child-process body: float64 loss and gradients of ``group``'s inputs, saved to its
    ``ref_path``; returns the loss and the seconds it took.

    The logits are materialised in float64 a block of rows at a time, ignored rows skipped
    (:func:`_reference.reference_linear_cross_entropy_rows`, the tests' reference); the gradient
    is that of the mean loss over the scored tokens.
    """
    H.child_setup(parent_pid, group.threads)
    t0 = time.perf_counter()
    hidden, weight, target = make_inputs(
        group.shape, DTYPES[group.dtype], group.prompt_share, group.seed
    )
    ref = reference_linear_cross_entropy_rows(
        hidden, weight, target, block_bytes=256 * MiB, stats=False
    )
    loss = ref["loss"]
    grads = {"grad_h": ref["grad_hidden"], "grad_w": ref["grad_weight"]}
    torch.save({"loss": loss, **grads, "rows": hidden.shape[0]}, group.ref_path)
    return {"loss": loss, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# the measured calls (child-process bodies)


def build_call(
    case: Case, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one forward + backward; returns the detached loss."""
    if case.impl == LOSSPLUG:
        import lossplug

        def loss_fn() -> torch.Tensor:
            return lossplug.linear_cross_entropy(hidden, weight, target, backend="torch")

    elif case.impl == MATERIALISED:
        upcast = hidden.dtype != torch.float32  # users upcast low-precision logits

        def loss_fn() -> torch.Tensor:
            logits = hidden @ weight.T
            return F.cross_entropy(logits.float() if upcast else logits, target)

    elif case.impl.startswith(("F.linear_cross_entropy", EXPLORE_PREFIX)):
        options = flce_options(case.impl, case.dtype)

        def loss_fn() -> torch.Tensor:
            return F.linear_cross_entropy(
                hidden, weight, target, ignore_index=IGNORE, options=options
            )

    elif case.impl == CCE:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        def loss_fn() -> torch.Tensor:
            return cce_linear_cross_entropy(hidden, weight, target, impl="torch_compile")

    else:
        raise ValueError(case.impl)

    def train_call() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return train_call


def _compiled_graphs() -> int:
    """Graphs ``torch.compile`` has made in this process (to spot a recompilation)."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def _warm_up(case: Case) -> None:
    """A tiny run of the same call: thread pools, lazy imports and dispatch caches get set up."""
    small = make_inputs((2, 16, 32, 96), DTYPES[case.dtype], case.prompt_share, case.seed)
    small[0].requires_grad_(True)
    small[1].requires_grad_(True)
    build_call(case, *small)()


def measure_memory(case: Case, parent_pid: int) -> Result:
    """Child-process body: peak extra memory of one cold call, and its errors vs float64.

    ``torch.compile`` guards on size ranges (CCE's graph compiled at the warm-up's tiny shape
    does not serve the real one), so the CCE case is warmed up at full size first: its
    measured call must not compile. A recompilation in the measured call is noted.
    """
    H.child_setup(parent_pid, case.threads)
    result = Result(case)
    try:
        if case.impl != CCE:  # CCE is warmed up at full size below
            _warm_up(case)
        hidden, weight, target = make_inputs(
            case.shape, DTYPES[case.dtype], case.prompt_share, case.seed
        )
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        call = build_call(case, hidden, weight, target)
        if case.impl == CCE:
            call()
            hidden.grad = weight.grad = None
        graphs = _compiled_graphs()
        seconds = []

        def timed() -> torch.Tensor:
            t0 = time.perf_counter()
            out = call()
            seconds.append(time.perf_counter() - t0)
            return out

        # the cold call: nothing of it is cached anywhere yet (but CCE's compiled graph)
        result.loss = float(H.cold_call(timed, result))
        result.cold_s = seconds[0]
        if _compiled_graphs() != graphs:
            result.note = "compiled during the measured call"
        result.grad_bytes = sum(
            t.numel() * t.element_size() for t in (hidden.grad, weight.grad) if t is not None
        )
        ref = torch.load(case.ref_path, mmap=True)
        result.loss_ref = ref["loss"]
        result.grad_err_h = max_rel_err(hidden.grad, ref["grad_h"])
        result.grad_err_w = max_rel_err(weight.grad, ref["grad_w"])
        if hidden.grad is None or weight.grad is None:
            result.note = "a gradient is missing"
    except Exception:  # reported in the table instead of ending the whole run
        result.error = H.last_error_line()
    return result


def measure_times(group: Group, parent_pid: int) -> dict[str, Any]:
    """Child-process body: interleaved timed calls of the timed impls of ``group``."""
    H.child_setup(parent_pid, group.threads)
    hidden, weight, target = make_inputs(
        group.shape, DTYPES[group.dtype], group.prompt_share, group.seed
    )
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    builders = {
        impl: partial(build_call, group.case(impl), hidden, weight, target)
        for impl in group.impls
        if impl not in group.untimed
    }

    def drop_grads() -> None:
        hidden.grad = weight.grad = None

    return H.time_interleaved(builders, group.repeats, after_each=drop_grads)


# ----------------------------------------------------------------------------------------------
# report


def _secs(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _seconds(res: Result) -> str:
    if res.median_s is not None:
        return _secs(res.median_s)
    if res.cold_s is not None:
        return f"{_secs(res.cold_s)} (1 cold call)"
    return "n/a"


def _time_of(res: Result) -> float | None:
    """The median, or for a case measured by its cold call only, that call's time."""
    return res.median_s if res.median_s is not None else res.cold_s


def format_tables(results: list[Result], groups: list[Group]) -> str:
    """One table per group (lossplug first, then each anchor with lossplug ÷ anchor), then the
    lossplug-against-the-anchors summary."""
    head = [
        "impl",
        "median s",
        "extra MiB",
        "extra / grads",
        "loss",
        "loss rel err",
        "grad err h",
        "grad err W",
        "lossplug time ratio",
        "lossplug mem ratio",
        "bg CPU",
    ]
    lines: list[str] = []
    summary = []
    for group in groups:
        rows = [r for r in results if r.case.ref_path == group.ref_path]
        if not rows:
            continue
        ours = next((r for r in rows if r.case.impl == LOSSPLUG and not r.error), None)
        table = []
        for res in rows:
            name = display_name(res.case.impl, res.case.dtype)
            cells = [name if res.case.impl == LOSSPLUG else f"  {name}"]
            if res.error:
                table.append([*cells, f"n/a: {res.error}"])
                continue
            cells += [
                _seconds(res),
                H.mib(res.extra_bytes),
                H.ratio(res.extra_bytes, res.grad_bytes),
                H.fmt(res.loss, ".5f"),
                H.fmt(res.loss_rel_err, ".1e"),
                H.fmt(res.grad_err_h, ".1e"),
                H.fmt(res.grad_err_w, ".1e"),
            ]
            if res.case.impl == LOSSPLUG or ours is None:
                cells += ["—", "—"]
            else:
                cells += [
                    H.ratio(_time_of(ours), _time_of(res)),
                    H.ratio(ours.extra_bytes, res.extra_bytes),
                ]
            bg = "—" if res.median_s is None else H.fmt(H.pct(res.background_cpu), ".0f") + "%"
            cells.append(bg + (f" ({res.note})" if res.note else ""))
            table.append(cells)
        batch, seq = group.shape[:2]
        masked = (
            f", first {group.prompt_share:.0%} of each of the {batch} sequences ignored"
            if group.prompt_share
            else ""
        )
        lines += [
            "",
            f"### {group.label} ({batch}x{seq} tokens{masked})",
            "",
            *H.markdown_table(head, table),
        ]
        summary.append(_summary_row(group, ours, rows))
    if summary:
        lines += [
            "",
            f"### lossplug against the fastest and the leanest anchor (DESIGN.md target on the "
            f"main group: time ≤ {TARGET_TIME:g}×, extra memory ≤ {TARGET_MEMORY:g}×)",
            "",
        ]
        lines += H.markdown_table(
            [
                "group",
                "lossplug s",
                "fastest anchor",
                "time ratio",
                "lossplug MiB",
                "leanest anchor",
                "mem ratio",
                "target",
            ],
            summary,
        )
    return "\n".join(lines)


def _summary_row(group: Group, ours: Result | None, rows: list[Result]) -> list[str]:
    anchors = [r for r in rows if r.case.impl != LOSSPLUG and not r.error]
    timed = [r for r in anchors if _time_of(r) is not None]
    sized = [r for r in anchors if r.extra_bytes is not None]
    fastest = min(timed, key=lambda r: _time_of(r) or 0.0, default=None)
    leanest = min(sized, key=lambda r: r.extra_bytes or 0, default=None)
    cells = [group.label]
    if ours is None or fastest is None or leanest is None:
        return [*cells, "n/a"]
    t_ratio = (_time_of(ours) or 0.0) / (_time_of(fastest) or 1.0)
    m_ratio = (ours.extra_bytes or 0) / max(leanest.extra_bytes or 1, 1)
    if group.name == "main":
        verdict = (
            f"time {_verdict(t_ratio, TARGET_TIME)}, memory {_verdict(m_ratio, TARGET_MEMORY)}"
        )
    else:
        verdict = "(no target)"
    return [
        *cells,
        _seconds(ours),
        f"{display_name(fastest.case.impl, fastest.case.dtype)} {_seconds(fastest)} s",
        f"{t_ratio:.2f}x",
        H.mib(ours.extra_bytes),
        f"{display_name(leanest.case.impl, leanest.case.dtype)} {H.mib(leanest.extra_bytes)} MiB",
        f"{m_ratio:.2f}x",
        verdict,
    ]


def _verdict(value: float, limit: float) -> str:
    """``met`` / ``**missed**`` for ``value ≤ limit`` at the precision the table shows."""
    return "met" if round(value, 2) <= limit else "**missed**"


def verdict_line(results: list[Result], groups: list[Group]) -> str:
    """One line: whether lossplug meets the DESIGN.md target in this run."""
    main = next((g for g in groups if g.name == "main"), None)
    if main is None:
        return "DESIGN.md target: not measured (the main group was not run)"
    rows = [r for r in results if r.case.ref_path == main.ref_path]
    ours = next((r for r in rows if r.case.impl == LOSSPLUG and not r.error), None)
    row = _summary_row(main, ours, rows)
    if len(row) < 8:
        return "DESIGN.md target: n/a (lossplug or every anchor failed)"
    met = "**missed**" not in row[7]
    shape = "" if main.shape == (8, 512, 512, 32000) else f" — measured at {main.label} instead"
    return (
        f"DESIGN.md target (fp32 N=4096 D=512 V=32000: ≤ {TARGET_TIME:g}x the fastest anchor's "
        f"time, ≤ {TARGET_MEMORY:g}x the leanest anchor's memory{shape}): "
        f"{'MET' if met else 'NOT MET'} in this run — time {row[3]} ({row[2]}), memory "
        f"{row[6]} ({row[5]}); {row[7]}"
    )


def progress_line(res: Result) -> str:
    case = res.case
    name = display_name(case.impl, case.dtype)
    if res.error:
        return f"  {name:58s} {res.error}"
    status = (
        f"{_seconds(res)} s, +{H.mib(res.extra_bytes)} MiB, loss rel err "
        f"{H.fmt(res.loss_rel_err, '.1e')}, grad err {H.fmt(res.grad_err, '.1e')}, "
        f"bg CPU {H.fmt(H.pct(res.background_cpu), '.0f')}%"
    )
    if res.note:
        status += f" ({res.note})"
    if res.timing_attempts > 1:
        status += f" (timing attempts: {res.timing_attempts})"
    return f"  {name:58s} {status}"


def plan(args: argparse.Namespace, ref_dir: str) -> list[Group]:
    """The groups to run (the exploration sweep instead with ``--explore``)."""
    if args.quick:
        main_shape, large_shape = (2, 64, 64, 1000), (1, 128, 96, 4000)
    else:
        main_shape, large_shape = (8, 512, 512, 32000), (1, 2048, 1024, 128256)
    large_repeats = args.large_repeats
    if args.explore:
        specs = [
            ("explore", main_shape, "fp32", 0.0, EXPLORE_OPTIONS["fp32"], args.repeats, ()),
            ("explore", large_shape, "bf16", 0.0, EXPLORE_OPTIONS["bf16"], large_repeats, ()),
        ]
        specs = [
            (name, shape, dtype, share, (LOSSPLUG, *map(explore_impl, opts)), reps, untimed)
            for name, shape, dtype, share, opts, reps, untimed in specs
        ]
    else:
        # F.linear_cross_entropy's auto setting on CPU bf16 ("accurate", 32-row chunks here)
        # takes ~45 s a call: its cold call is its only measurement there
        slow = () if args.quick else (FLCE_CHUNKED,)
        # compiling CCE costs seconds in every process: --quick compiles it in one group only
        others = tuple(i for i in OTHER_IMPLS if i != CCE) if args.quick else OTHER_IMPLS
        specs = [
            ("main", main_shape, "fp32", 0.0, MAIN_IMPLS, args.repeats, ()),
            ("prompt-masked", main_shape, "fp32", args.prompt_share, others, args.repeats, ()),
            ("large", large_shape, "bf16", 0.0, others, large_repeats, slow),
        ]
    groups = [
        Group(
            name,
            shape,
            dtype,
            share,
            impls,
            repeats,
            args.threads,
            os.path.join(ref_dir, f"reference{i}.pt"),
            untimed,
        )
        for i, (name, shape, dtype, share, impls, repeats, untimed) in enumerate(specs)
    ]
    if args.only:
        groups = [g for g in groups if any(text in g.label for text in args.only)]
    return groups


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=3,
        help="timed calls per case in the large (bf16, V=128256) group (default 3)",
    )
    parser.add_argument(
        "--prompt-share",
        type=float,
        default=0.25,
        help="share of each sequence ignored in the prompt-masked group (default 0.25)",
    )
    parser.add_argument(
        "--explore",
        action="store_true",
        help="instead of the comparison, time F.linear_cross_entropy's explicit options "
        "against each other (the source of BEST_OPTIONS)",
    )


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.large_repeats < 1:
        parser.error("--large-repeats must be >= 1")
    if not 0.0 <= args.prompt_share < 1.0:
        parser.error("--prompt-share must be in [0, 1)")
    # one inductor compile worker: no idle pool of processes beside the measured ones
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _extend_info(info: dict[str, str]) -> None:
    try:
        from importlib.metadata import version

        info["lossplug"] += f", cut-cross-entropy {version('cut-cross-entropy')}"
    except Exception:
        info["lossplug"] += ", cut-cross-entropy not installed"


def _method(args: argparse.Namespace, groups: list[Group], policy: dict[str, Any]) -> str:
    n_cases = sum(len(g.impls) for g in groups)
    return (
        f"{n_cases} cases; fwd + bwd w.r.t. h and W, reduction mean; peak extra memory "
        f"(RSS above the inputs, gradients included) and errors from one cold call, each "
        f"case in its own process; time = median of {args.repeats} calls per case "
        f"({args.large_repeats} in the large group), lossplug and its anchors interleaved "
        f"in one process per group after a full-size warm-up call each; "
        f"{H.describe_policy(policy)}"
    )


def _before_group(group: Group, ctx: Any) -> None:
    """The group's float64 reference, in a child of its own (its memory is not the cases')."""
    print(f"{group.label}", flush=True)
    try:
        ref = H.run_in_child(compute_reference, group, ctx)
        print(f"  float64 reference: loss {ref['loss']:.6f} ({ref['seconds']:.0f} s)")
    except Exception as exc:
        print(f"  float64 reference failed: {type(exc).__name__}: {exc}")


def _after_group(group: Group) -> None:
    if os.path.exists(group.ref_path):
        os.remove(group.ref_path)


def _pairs(group: Group) -> dict[str, tuple[str, ...]]:
    timed = [i for i in group.impls if i not in group.untimed]
    return {LOSSPLUG: tuple(i for i in timed if i != LOSSPLUG)}


def _report(results: list[H.Result], groups: list[Group]) -> str:
    return format_tables(results, groups) + "\n\n" + verdict_line(results, groups)


SPEC = H.BenchmarkSpec(
    title="lossplug linear_cross_entropy CPU",
    description=__doc__.splitlines()[0],
    preload=PRELOAD,
    repeats=5,
    only_example="main",
    plan=plan,
    measure_memory=measure_memory,
    measure_times=measure_times,
    method=_method,
    progress=progress_line,
    notes=(
        "- ratios are lossplug ÷ anchor (below 1 = lossplug faster / leaner); extra MiB = peak "
        "RSS above the inputs during the call, the gradients of h and W included; extra / grads "
        "= that over the bytes of those two gradients; grad err = max|g - g_ref| / max|g_ref| "
        "per tensor, loss rel err against float64 on the same (rounded) inputs; bg CPU = share "
        "of all cores used by other processes while the group was timed",
        f"- {DESIGN_ANCHORS}",
    ),
    report=_report,
    pairs=_pairs,
    make_result=Result,
    add_arguments=_add_arguments,
    check_arguments=_check_arguments,
    extend_info=_extend_info,
    before_group=_before_group,
    after_group=_after_group,
    errors_allowed=(CCE,),  # an optional anchor: not installed, or no compiler
)


def main(argv: list[str] | None = None) -> int:
    return H.run_benchmark(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
