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
included) comes from one cold call of each case in its own child process (``_harness/``); the
same call gives the loss error and the largest gradient error against a float64 reference
(materialised float64 logits, computed once per group in a child of its own from the very values
the cases saw: bf16 inputs are compared with their own rounded values). Times are the median of
``--repeats`` calls, lossplug and its anchors interleaved round-robin in one child process per
group, so load from other processes hits all of them alike; that load is reported too.

Usage::

    python benchmarks/linear_cross_entropy.py              # full run
    python benchmarks/linear_cross_entropy.py --quick      # tiny shapes, smoke test
    python benchmarks/linear_cross_entropy.py --only main --repeats 9 --json lce.json
    python benchmarks/linear_cross_entropy.py --explore    # LinearCrossEntropyOptions sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE, MiB

from _reference import max_rel_err, reference_linear_cross_entropy_rows

LOSSPLUG = "lossplug"
MATERIALISED = "materialised"
FLCE_REFERENCE = "F.linear_cross_entropy (reference)"
FLCE_CHUNKED = "F.linear_cross_entropy (chunked)"
FLCE_BEST = "F.linear_cross_entropy (best)"
CCE = "CCE torch.compile"
MAIN_IMPLS = (LOSSPLUG, MATERIALISED, FLCE_REFERENCE, FLCE_CHUNKED, FLCE_BEST, CCE)
# the reference path is the materialised loss again: left out where time is short
OTHER_IMPLS = (LOSSPLUG, MATERIALISED, FLCE_CHUNKED, FLCE_BEST, CCE)

#: The fastest explicit ``LinearCrossEntropyOptions`` of ``--explore`` on the machine of
#: RESULTS.md, per input dtype: fp32 1024-row chunks with the default ``"compact"`` policy, bf16
#: 512-row chunks with the ``"accurate"`` policy (the sweep and its numbers are in RESULTS.md).
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
class Case(H.Case):
    """:class:`_harness.Case` plus the group's name, its ignored share and its reference file;
    ``shape`` is (sequences, sequence length, hidden size D, vocabulary V)."""

    name: str  # the group's: "main", "prompt-masked", "large" or "explore"
    prompt_share: float  # share of each sequence's first targets set to -100
    ref_path: str  # where the group's float64 reference is saved


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
        return H.rel_err(self.loss, self.loss_ref)

    @property
    def grad_err(self) -> float | None:
        errs = [e for e in (self.grad_err_h, self.grad_err_w) if e is not None]
        return max(errs) if errs else None


# ----------------------------------------------------------------------------------------------
# inputs and the float64 reference


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h [N, D]``, ``W [V, D]`` and ``y [N]`` of :func:`_harness.linear_inputs`; the first
    ``prompt_share`` of each of the ``shape[0]`` sequences is ignored (``-100``), as prompt tokens
    in supervised fine-tuning."""
    batch, seq, dim, vocab = case.shape
    gen = torch.Generator().manual_seed(case.seed)
    hidden, weight, target = H.linear_inputs(batch * seq, dim, vocab, case.torch_dtype, gen)
    prompt = round(seq * case.prompt_share)
    if prompt:
        target.view(batch, seq)[:, :prompt] = IGNORE
    return hidden, weight, target


def compute_reference(group: H.Group, parent_pid: int) -> dict[str, float]:
    """Child-process body: float64 loss and gradients of ``group``'s inputs, saved to its
    ``ref_path``; returns the loss and the seconds it took.

    The logits are materialised in float64 a block of rows at a time, ignored rows skipped
    (:func:`_reference.reference_linear_cross_entropy_rows`, the tests' reference); the gradient
    is that of the mean loss over the scored tokens.
    """
    H.child_setup(parent_pid, group.setup.threads)
    t0 = time.perf_counter()
    hidden, weight, target = make_inputs(group.setup)
    ref = reference_linear_cross_entropy_rows(
        hidden, weight, target, block_bytes=256 * MiB, stats=False
    )
    loss = ref["loss"]
    grads = {"grad_h": ref["grad_hidden"], "grad_w": ref["grad_weight"]}
    torch.save({"loss": loss, **grads, "rows": hidden.shape[0]}, group.setup.ref_path)
    return {"loss": loss, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# the measured calls


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


def format_tables(results: list[Result], groups: list[H.Group]) -> str:
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
        rows = [r for r in results if r.case.ref_path == group.setup.ref_path]
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
            cells += H.anchor_ratios(ours, res, _time_of)
            bg = "—" if res.median_s is None else H.pct(res.background_cpu)
            cells.append(bg + (f" ({res.note})" if res.note else ""))
            table.append(cells)
        batch, seq = group.setup.shape[:2]
        masked = (
            f", first {group.setup.prompt_share:.0%} of each of the {batch} sequences ignored"
            if group.setup.prompt_share
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


def _summary_row(group: H.Group, ours: Result | None, rows: list[Result]) -> list[str]:
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
    verdict = "(no target)"
    if group.setup.name == "main":
        time_ok, memory_ok = H.verdict(t_ratio, TARGET_TIME), H.verdict(m_ratio, TARGET_MEMORY)
        verdict = f"time {time_ok}, memory {memory_ok}"
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


def verdict_line(results: list[Result], groups: list[H.Group]) -> str:
    """One line: whether lossplug meets the DESIGN.md target in this run."""
    main = next((g for g in groups if g.setup.name == "main"), None)
    if main is None:
        return "DESIGN.md target: not measured (the main group was not run)"
    rows = [r for r in results if r.case.ref_path == main.setup.ref_path]
    ours = next((r for r in rows if r.case.impl == LOSSPLUG and not r.error), None)
    row = _summary_row(main, ours, rows)
    if len(row) < 8:
        return "DESIGN.md target: n/a (lossplug or every anchor failed)"
    met = "**missed**" not in row[7]
    design_shape = main.setup.shape == (8, 512, 512, 32000)
    shape = "" if design_shape else f" — measured at {main.label} instead"
    return (
        f"DESIGN.md target (fp32 N=4096 D=512 V=32000: ≤ {TARGET_TIME:g}x the fastest anchor's "
        f"time, ≤ {TARGET_MEMORY:g}x the leanest anchor's memory{shape}): "
        f"{'MET' if met else 'NOT MET'} in this run — time {row[3]} ({row[2]}), memory "
        f"{row[6]} ({row[5]}); {row[7]}"
    )


def _compiled_graphs() -> int:
    """Graphs ``torch.compile`` has made in this process (to spot a recompilation)."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def _with_grads(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of ``case``, ``h`` and ``W`` requiring a gradient."""
    hidden, weight, target = make_inputs(case)
    return hidden.requires_grad_(True), weight.requires_grad_(True), target


class LinearCrossEntropyBenchmark(H.Benchmark):
    title = "lossplug linear_cross_entropy CPU"
    description = __doc__.splitlines()[0]
    preload = ("torch", "torch.nn.functional", "lossplug")
    only_example = "main"
    result_type = Result
    errors_allowed = (CCE,)  # an optional anchor: not installed, or no compiler
    job = "fwd + bwd w.r.t. h and W, reduction mean; "
    measured = "peak extra memory (RSS above the inputs, gradients included) and errors"
    warm_up = "a full-size warm-up call"
    notes = (
        H.legend(
            "anchor",
            "extra MiB = peak RSS above the inputs during the call, the gradients of h and W "
            "included",
            "extra / grads = that over the bytes of those two gradients",
            "grad err = max|g - g_ref| / max|g_ref| per tensor, loss rel err against float64 on "
            "the same (rounded) inputs",
        ),
        f"- {DESIGN_ANCHORS}",
    )

    inputs = staticmethod(_with_grads)
    build_call = staticmethod(build_call)

    def measure(self, case: Case, result: Result) -> None:
        """``torch.compile`` guards on size ranges (CCE's graph compiled at the warm-up's tiny
        shape does not serve the real one), so the CCE case is warmed up at full size instead:
        its measured call must not compile. A recompilation in the measured call is noted."""
        if case.impl != CCE:
            # a tiny run first: thread pools, lazy imports and dispatch caches get set up
            small = dataclasses.replace(case, shape=(2, 16, 32, 96))
            build_call(case, *_with_grads(small))()
        hidden, weight, target = _with_grads(case)
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

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
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

    def check_arguments(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.large_repeats < 1:
            parser.error("--large-repeats must be >= 1")
        if not 0.0 <= args.prompt_share < 1.0:
            parser.error("--prompt-share must be in [0, 1)")
        # one inductor compile worker: no idle pool of processes beside the measured ones
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

    def plan(self, args: argparse.Namespace, workdir: str) -> list[H.Group]:
        """The groups to run (the exploration sweep instead with ``--explore``)."""
        if args.quick:
            main_shape, large_shape = (2, 64, 64, 1000), (1, 128, 96, 4000)
        else:
            main_shape, large_shape = (8, 512, 512, 32000), (1, 2048, 1024, 128256)
        large_repeats = args.large_repeats
        if args.explore:
            specs = [
                ("explore", main_shape, "fp32", 0.0, args.repeats, ()),
                ("explore", large_shape, "bf16", 0.0, large_repeats, ()),
            ]
            impls_of = {
                dtype: (LOSSPLUG, *map(explore_impl, options))
                for dtype, options in EXPLORE_OPTIONS.items()
            }
        else:
            # F.linear_cross_entropy's auto setting on CPU bf16 ("accurate", 32-row chunks here)
            # is too slow to repeat: its cold call is its only measurement there
            slow = () if args.quick else (FLCE_CHUNKED,)
            specs = [
                ("main", main_shape, "fp32", 0.0, args.repeats, ()),
                ("prompt-masked", main_shape, "fp32", args.prompt_share, args.repeats, ()),
                ("large", large_shape, "bf16", 0.0, large_repeats, slow),
            ]
            # compiling CCE costs seconds in every process: --quick compiles it in one group only
            others = tuple(i for i in OTHER_IMPLS if i != CCE) if args.quick else OTHER_IMPLS
            impls_of = {"main": MAIN_IMPLS, "prompt-masked": others, "large": others}
        groups = []
        for i, (name, shape, dtype, share, repeats, untimed) in enumerate(specs):
            path = os.path.join(workdir, f"reference{i}.pt")
            setup = Case(name, share, path, shape=shape, dtype=dtype, threads=args.threads)
            batch, seq, dim, vocab = shape
            label = f"{name}: N={batch * seq} D={dim} V={vocab} {dtype}"
            impls = impls_of[dtype if args.explore else name]
            groups.append(H.Group(label, setup, impls, repeats, untimed))
        return groups

    def timed_calls(self, args: argparse.Namespace) -> str:
        return f"{args.repeats} calls per case ({args.large_repeats} in the large group)"

    def info(self) -> dict[str, str]:
        return H.machine_info(**{"cut-cross-entropy": H.version_of("cut-cross-entropy")})

    def before_group(self, group: H.Group, ctx: Any) -> None:
        """The group's float64 reference, in a child of its own (its memory is not the cases')."""
        print(f"{group.label}", flush=True)
        try:
            ref = H.run_in_child(compute_reference, group, ctx)
            print(f"  float64 reference: loss {ref['loss']:.6f} ({ref['seconds']:.0f} s)")
        except Exception as exc:
            print(f"  float64 reference failed: {type(exc).__name__}: {exc}")

    def after_group(self, group: H.Group) -> None:
        if os.path.exists(group.setup.ref_path):
            os.remove(group.setup.ref_path)

    def report(self, results: list[Result], groups: list[H.Group]) -> str:
        return format_tables(results, groups) + "\n\n" + verdict_line(results, groups)

    def progress(self, res: Result) -> str:
        name = display_name(res.case.impl, res.case.dtype)
        status = (
            f"{_seconds(res)} s, +{H.mib(res.extra_bytes)} MiB, loss rel err "
            f"{H.fmt(res.loss_rel_err, '.1e')}, grad err {H.fmt(res.grad_err, '.1e')}, "
            f"bg CPU {H.pct(res.background_cpu)}"
        )
        return H.progress_line(res, f"{name:58s}", status + (f" ({res.note})" if res.note else ""))


if __name__ == "__main__":
    sys.exit(LinearCrossEntropyBenchmark().main())
