"""GPU checks of lossplug's Triton cross-entropy: correctness at real size, speed, peak memory.

1. Correctness of ``backend="triton"`` (loss, every ``TokenStats`` field, the gradient) against a
   float64 reference computed a few rows at a time: bf16 ``[8192, 128256]``, a ``[16896, 128256]``
   case whose ``N * V`` exceeds ``2**31`` (int64 offsets), and a strided ``shift=True`` case.
2. Median times (CUDA events) of forward, forward + backward and forward-only statistics for
   lossplug-triton, eager ``F.cross_entropy`` (with the ``.float()`` upcast users write),
   ``torch.compile`` of the same, and Liger-Kernel's ``LigerCrossEntropyLoss`` when it imports;
   peak extra memory from ``torch.cuda.max_memory_allocated``; each time next to the memory
   floor of DESIGN.md (one read + one write of the logits at 3.0 TB/s) as a ratio.
3. Linear cross-entropy (``lossplug.linear_cross_entropy``, hidden ``[N, D]`` and weight
   ``[V, D]``, the logits never materialised): correctness of ``backend="triton"`` (loss, every
   ``TokenStats`` field, the hidden and weight gradients) against a float64 reference with
   materialised float64 logits, in bf16 and fp32 at ``[4099, 2040] x [50257, 2040]`` (odd sizes:
   masked tiles); then fwd + bwd times at bf16 N=8192, D=4096, V=128256 of lossplug (triton and
   torch backends), eager and ``torch.compile``'d materialised logits,
   ``F.linear_cross_entropy`` chunked, Cut Cross-Entropy and Liger's fused linear cross-entropy
   when they import, each as a multiple of the FLOP floor ``6 N D V`` at 800 TFLOP/s (32 ms) and
   next to the DESIGN.md target (<= 1.4x the floor, peak extra memory <= CCE's).
4. One PASS/FAIL line per target last (correctness of each op, each DESIGN.md timing and memory
   target; N/A where an anchor is missing, SKIP for timings under ``--tiny``). The exit status
   is 1 when a correctness check fails, whatever the timings.

``--quick`` leaves out the ``N * V > 2**31`` case and ``torch.compile``, and times 5 calls
instead of 20. The machinery (inputs, timing on the device, tables, verdicts, the header) is the
CPU benchmarks' own, ``_harness``. This file holds the cross-entropy section and the command
line; ``gpu_linear.py`` the linear cross-entropy section, ``gpu_targets.py`` the targets, the
tolerances and the target lines.

``--tiny`` runs the same code paths on the CPU with tiny shapes under ``TRITON_INTERPRET=1``
(wall-clock timing, no memory numbers) so the script is known to work without a GPU; there the
linear cross-entropy rows run lossplug's torch backend (checked for correctness too), and the
Triton one is checked under the interpreter at a tiny shape::

    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --tiny
    bash benchmarks/gpu_suite.sh            # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict

if "--tiny" in sys.argv[1:]:
    # Triton reads this when a kernel is defined, i.e. when lossplug's kernel module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE, MiB
from gpu_linear import format_lce_timings, run_lce_correctness, run_lce_timings
from gpu_targets import (
    BLOCK_BYTES,
    STAT_TOLERANCES,
    TARGET_FWD_BWD,
    TARGET_STATS,
    Check,
    Timing,
    format_checks,
    na_note,
    stat_checks,
    target_lines,
    yes_no,
)

import _reference
import lossplug

HBM_BYTES_PER_S = 3.0e12  # DESIGN.md floor: H100 SXM memory bandwidth
BF16_ROUNDOFF = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" else 2.0**-8


# ----------------------------------------------------------------------------------------------
# inputs and the float64 reference


def make_inputs(
    rows: int, vocab: int, device: torch.device, seed: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, vocab]`` logits and targets, built in slices (no full float32 temporary).

    Logits are ``2 * randn`` with a random bump on each row's target, so the true class is often
    near the top as with a trained model; one row in sixteen is ignored.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    logits = torch.empty(rows, vocab, device=device, dtype=dtype)
    H.fill_logits(logits, target, gen, block_bytes=BLOCK_BYTES)
    ignored = torch.rand(rows, device=device, generator=gen) < 1 / 16
    target = target.masked_fill(ignored, IGNORE)
    return logits, target


def reference_rows(
    logits2d: torch.Tensor, target: torch.Tensor, grad2d: torch.Tensor | None
) -> dict[str, float]:
    """Float64 loss statistics of ``logits2d`` rows, and the gradient error of the mean loss.

    Runs a slice of rows at a time so the float64 copy never exists whole. The gradient check is
    elementwise: ``|g - g_ref| <= (u + 2**-14) |g_ref| + 1e-6 max|g_ref|`` with ``u`` the bf16
    unit roundoff ``2**-8`` (``2**-14`` and the absolute term are slack for float32 arithmetic);
    ``grad_excess`` is the largest ratio of error to bound. The Triton interpreter truncates
    float32 -> bf16 instead of rounding to nearest (whatever ``fp_downcast_rounding`` says), so
    there ``u`` is one ulp, ``2**-7``.
    """
    ref = _reference.reference_cross_entropy_rows(
        logits2d,
        target,
        grad2d,
        ignore_index=IGNORE,
        block_bytes=512 * MiB,
        grad_rtol=BF16_ROUNDOFF + 2.0**-14,
        grad_atol=1e-6,
    )
    if grad2d is not None:
        del ref["grad_max_ref"]
    return ref


def check_case(
    name: str,
    leaf: torch.Tensor,
    target: torch.Tensor,
    *,
    shift: bool = False,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Check]:
    """Run lossplug-triton forward + backward with stats and compare with float64.

    ``view`` (e.g. ``lambda t: t[:, :-1]``) makes the op see a strided view of ``leaf``; the
    gradient is then checked on the same view of ``leaf.grad``.
    """
    view = view or (lambda t: t)
    leaf.requires_grad_(True)
    logits = view(leaf)
    loss, stats = lossplug.cross_entropy(
        logits, target, shift=shift, return_stats=True, backend="triton"
    )
    loss.backward()
    with torch.no_grad():
        logits, grad = logits.detach(), view(leaf.grad)
        vocab = logits.shape[-1]
        if shift:
            rows_logits = logits[..., :-1, :].reshape(-1, vocab)
            rows_grad = grad[..., :-1, :].reshape(-1, vocab)
            rows_target = target[..., 1:].reshape(-1)
            # the last position of every sequence is not scored: its gradient must be exactly 0
            tail_grad = float(grad[..., -1, :].abs().max())
        else:
            rows_logits, rows_grad, rows_target = logits, grad, target
            tail_grad = 0.0
        ref = reference_rows(rows_logits, rows_target, rows_grad)
    leaf.grad = None
    leaf.requires_grad_(False)

    checks = stat_checks(name, loss, stats, ref, STAT_TOLERANCES)
    excess = ref["grad_excess"]
    checks.append(Check(name, "grad (worst err / bound)", excess, 1.0, excess, 1.0))
    if shift:
        checks.append(Check(name, "grad at unscored tail", tail_grad, 0.0, tail_grad, 0.0))
    return checks


def run_correctness(device: torch.device, tiny: bool, quick: bool = False) -> list[Check]:
    """The three correctness cases (two under ``quick``: no ``N * V > 2**31`` one); tiny
    analogues of the same code paths under ``--tiny``."""
    checks: list[Check] = []
    if tiny:
        big, huge, strided = (96, 1000), (80, 777), (2, 33, 500)
    else:
        big, huge, strided = (8192, 128256), (16896, 128256), (4, 1024, 128256)

    logits, target = make_inputs(*big, device, seed=1)
    checks += check_case(f"bf16 {big[0]}x{big[1]}", logits, target)
    del logits, target
    H.free(device)

    if not quick:
        logits, target = make_inputs(*huge, device, seed=2)
        label = f"bf16 {huge[0]}x{huge[1]}"
        if logits.numel() > 2**31:
            label += " (N*V > 2^31)"
        checks += check_case(label, logits, target)
        del logits, target
        H.free(device)

    # logits[:, :-1] of a [B, S+1, V] buffer: outer stride != S * V, plus shift=True
    b, s, v = strided
    flat, flat_target = make_inputs(b * (s + 1), v, device, seed=3)
    checks += check_case(
        f"bf16 {b}x{s}x{v} strided view, shift=True",
        flat.view(b, s + 1, v),
        flat_target.view(b, s + 1)[:, :-1],
        shift=True,
        view=lambda t: t[:, :-1],
    )
    del flat, flat_target
    H.free(device)
    return checks


# ----------------------------------------------------------------------------------------------
# timing


def _liger_loss() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str]:
    """Liger-Kernel's cross-entropy module, or None and why it is not available."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception as exc:  # not installed, or an import that needs what is not here
        return None, na_note(exc)
    return LigerCrossEntropyLoss(ignore_index=IGNORE), ""


def run_timings(device: torch.device, tiny: bool, repeats: int, compile_: bool) -> list[Timing]:
    """Every (implementation, mode) pair on one bf16 shape; clobbered logits are restored."""
    rows, vocab = (64, 1000) if tiny else (8192, 128256)
    warmup = 1 if tiny else 3
    logits, target = make_inputs(rows, vocab, device, seed=4)
    pristine = logits.clone()  # Liger and inplace_backward overwrite the logits
    bytes_logits = logits.numel() * logits.element_size()
    floor_read = bytes_logits / HBM_BYTES_PER_S * 1e3
    floors = {"fwd": floor_read, "fwd+bwd": 2 * floor_read, "stats": floor_read}

    def upcast_ce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.float(), y, ignore_index=IGNORE)

    def lossplug_ce(x: torch.Tensor, y: torch.Tensor, **kw: object) -> torch.Tensor:
        return lossplug.cross_entropy(x, y, backend="triton", **kw)

    liger, liger_missing = _liger_loss()
    impls: dict[str, Callable[..., torch.Tensor] | None] = {
        "lossplug-triton": lossplug_ce,
        "lossplug-triton inplace": lambda x, y: lossplug_ce(x, y, inplace_backward=True),
        "torch eager (.float())": upcast_ce,
        "torch.compile (.float())": torch.compile(upcast_ce) if compile_ else None,
        "liger CrossEntropyLoss": liger,
    }
    notes = {
        ("lossplug-triton", "stats"): "loss + all TokenStats",
        ("torch eager (.float())", "stats"): "exp(loss) only",
        ("torch.compile (.float())", "stats"): "exp(loss) only",
        ("liger CrossEntropyLoss", "fwd"): "grad computed in fwd, in place",
        ("liger CrossEntropyLoss", "fwd+bwd"): "grad computed in fwd, in place",
        ("liger CrossEntropyLoss", "stats"): "exp(loss) only",
    }
    results: list[Timing] = []
    for impl, fn in impls.items():
        modes = ("fwd+bwd",) if impl.endswith("inplace") else ("fwd", "fwd+bwd", "stats")
        for mode in modes:
            timing = Timing(impl, mode, floor_ms=floors[mode], note=notes.get((impl, mode), ""))
            results.append(timing)
            if fn is None:
                timing.note = liger_missing if "liger" in impl else "n/a (skipped)"
                continue
            logits.copy_(pristine)
            try:
                run, reset = _mode_call(impl, mode, fn, logits, target, pristine)
                timing.times_ms, timing.peak_extra_bytes = H.time_on_device(
                    run, reset, device, repeats, warmup
                )
            except Exception as exc:  # e.g. torch.compile without a working C++ toolchain
                timing.note = na_note(exc)
                traceback.print_exc(limit=2)
            logits.requires_grad_(False)
            logits.grad = None
            H.free(device)
    return results


def _mode_call(
    impl: str,
    mode: str,
    fn: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    target: torch.Tensor,
    pristine: torch.Tensor,
) -> tuple[Callable[[], object], Callable[[], None]]:
    """The zero-argument call timed for ``mode`` and the reset run after each call."""
    clobbers = impl.startswith("liger") or impl.endswith("inplace")

    def reset() -> None:
        logits.grad = None
        if clobbers:
            with torch.no_grad():
                logits.copy_(pristine)

    if mode == "stats":
        logits.requires_grad_(False)
        if impl.startswith("lossplug"):

            def run() -> object:
                with torch.no_grad():
                    _, stats = fn(logits, target, return_stats=True)
                    return stats.perplexity, stats.accuracy, stats.entropy

        else:

            def run() -> object:
                with torch.no_grad():
                    return fn(logits, target).exp()

        return run, reset

    logits.requires_grad_(True)
    if mode == "fwd":

        def run() -> object:
            return fn(logits, target)

    else:

        def run() -> object:
            loss = fn(logits, target)
            loss.backward()
            return loss

    return run, reset


# ----------------------------------------------------------------------------------------------
# report


def environment(device: torch.device) -> dict[str, str]:
    """The machine, the device and the library versions of the anchors."""
    import triton

    return H.machine_info(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        triton=triton.__version__,
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"),
        **{name: H.version_of(name) for name in ("liger-kernel", "cut-cross-entropy")},
    )


def format_timings(results: list[Timing], shape: str) -> str:
    """Final table: time, floor ratio, peak extra memory, and the DESIGN.md target verdicts."""
    liger = next((t for t in results if t.impl.startswith("liger") and t.mode == "fwd+bwd"), None)
    head = ["impl", "mode", "median ms", "floor ms", "x floor", "peak extra MiB", "target", "note"]
    rows = []
    for t in results:
        target = ""
        if t.impl == "lossplug-triton" and t.x_floor is not None:
            if t.mode == "fwd+bwd":
                target = f"<= {TARGET_FWD_BWD}x: {yes_no(t.x_floor <= TARGET_FWD_BWD)}"
                if liger is not None and liger.median_ms is not None:
                    target += f"; < liger: {yes_no(t.median_ms < liger.median_ms)}"
            elif t.mode == "stats":
                target = f"<= {TARGET_STATS}x: {yes_no(t.x_floor <= TARGET_STATS)}"
        cells = [t.impl, t.mode, H.fmt(t.median_ms, ".3f"), f"{t.floor_ms:.3g}"]
        rows.append([*cells, H.fmt(t.x_floor, ".3g"), H.mib(t.peak_extra_bytes), target, t.note])
    title = f"bf16 {shape}; floor = logits bytes read (+ written) at 3.0 TB/s"
    return "\n".join([title, "", *H.markdown_table(head, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument(
        "--skip-linear", action="store_true", help="leave out the linear cross-entropy section"
    )
    parser.add_argument(
        "--linear-only", action="store_true", help="run only the linear cross-entropy section"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the short run: no N*V > 2**31 case, no torch.compile, 5 timed calls",
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.skip_linear and args.linear_only:
        parser.error("--skip-linear and --linear-only exclude each other")

    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run on a GPU machine, or use --tiny for the CPU smoke run")
        return 2
    repeats = args.repeats or (3 if args.tiny else 5 if args.quick else 20)
    compile_ = not (args.no_compile or args.quick)
    info = environment(device)
    clock = "CUDA events" if device.type == "cuda" else "wall clock"
    method = f"timing: median of {repeats} calls ({clock})"
    print(H.header("lossplug GPU suite", info, torch.get_num_threads(), method) + "\n", flush=True)

    checks: list[Check] = []
    timings: list[Timing] = []
    if not args.linear_only:
        if not args.skip_correctness:
            t0 = time.perf_counter()
            checks = run_correctness(device, args.tiny, quick=args.quick)
            print(f"## Correctness vs float64 ({time.perf_counter() - t0:.1f} s)\n")
            print(format_checks(checks) + "\n", flush=True)

        t0 = time.perf_counter()
        timings = run_timings(device, args.tiny, repeats, compile_=compile_)
        shape = "64x1000" if args.tiny else "8192x128256"
        print(f"## Timings ({time.perf_counter() - t0:.1f} s)\n")
        print(format_timings(timings, shape) + "\n", flush=True)
        H.free(device)

    lce_checks: list[Check] = []
    lce_timings: list[Timing] = []
    if not args.skip_linear:
        if not args.skip_correctness:
            t0 = time.perf_counter()
            lce_checks = run_lce_correctness(device, args.tiny)
            print(
                f"## Linear cross-entropy: correctness vs float64 "
                f"({time.perf_counter() - t0:.1f} s)\n"
            )
            print(format_checks(lce_checks) + "\n", flush=True)
        t0 = time.perf_counter()
        lce_timings, lce_shape = run_lce_timings(device, args.tiny, repeats, compile_=compile_)
        print(f"## Linear cross-entropy: timings ({time.perf_counter() - t0:.1f} s)\n")
        print(format_lce_timings(lce_timings, lce_shape), flush=True)
    print("\n## Targets\n")
    print("\n".join(target_lines(checks, lce_checks, timings + lce_timings, args.tiny)))
    checks += lce_checks
    timings += lce_timings
    failed = [c for c in checks if not c.ok]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "environment": info,
                    "checks": [{**asdict(c), "ok": c.ok} for c in checks],
                    "timings": [{**asdict(t), "median_ms": t.median_ms} for t in timings],
                },
                fh,
                indent=1,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
