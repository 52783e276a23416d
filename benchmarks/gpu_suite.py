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
CPU benchmarks' own, ``_harness.py``.

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
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

if "--tiny" in sys.argv[1:]:
    # Triton reads this when a kernel is defined, i.e. when lossplug's kernel module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE, MiB

import _reference
import lossplug

HBM_BYTES_PER_S = 3.0e12  # DESIGN.md floor: H100 SXM memory bandwidth
# DESIGN.md targets, as multiples of the floor
TARGET_FWD_BWD = 1.3
TARGET_STATS = 1.2
BF16_ROUNDOFF = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" else 2.0**-8
# linear cross-entropy: FLOP floor 6·N·D·V (forward matmul, two backward matmuls) at this rate
PEAK_FLOPS = 800e12
TARGET_LCE_FLOOR = 1.4
LCE_TIMING_SHAPE = (8192, 4096, 128256)  # N, D, V
LCE_CHECK_SHAPE = (4099, 2040, 50257)
BLOCK_BYTES = 256 * MiB  # inputs are built this much float32 at a time
STAT_FIELDS = ("nll_sum", "tokens", "correct", "entropy_sum", "lse_sq_sum")  # TokenStats sums
# relative tolerances of the statistics; perplexity's 1e-4 is the DESIGN.md rule, the sums can do
# better (a near-tie may flip an argmax of the linear op, whose logits are rounded differently)
STAT_TOLERANCES = {
    "loss": 1e-5,
    "nll_sum": 1e-5,
    "tokens": 0.0,
    "correct": 0.0,
    "entropy_sum": 1e-4,
    "lse_sq_sum": 1e-5,
    "perplexity": 1e-4,
}


@dataclass
class Check:
    """One correctness comparison against the float64 reference."""

    case: str
    quantity: str
    value: float
    reference: float
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class Timing:
    """One (implementation, mode) measurement."""

    impl: str
    mode: str  # "fwd", "fwd+bwd" or "stats"
    times_ms: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    floor_ms: float = 0.0
    note: str = ""
    section: str = "cross_entropy"  # or "linear_cross_entropy"

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def x_floor(self) -> float | None:
        """The median time as a multiple of the floor."""
        return None if self.median_ms is None else self.median_ms / self.floor_ms


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


def stat_checks(
    name: str, loss: torch.Tensor, stats: Any, ref: dict[str, float], tol: dict[str, float]
) -> list[Check]:
    """The loss, every ``TokenStats`` sum and the perplexity against the float64 ``ref``."""
    got = {"loss": float(loss.detach())}
    got.update({key: float(getattr(stats, key)) for key in STAT_FIELDS})
    got["perplexity"] = float(stats.perplexity)
    ref = {**ref, "perplexity": float(torch.tensor(ref["loss"]).double().exp())}
    return [Check(name, k, v, ref[k], H.rel_err(v, ref[k]) or 0.0, tol[k]) for k, v in got.items()]


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
        return None, _na(exc)
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
                timing.note = _na(exc)
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
# linear cross-entropy: hidden [N, D] and weight [V, D], the [N, V] logits never held


def make_lce_inputs(
    rows: int,
    dim: int,
    vocab: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_harness.linear_inputs` with one row in sixteen ignored."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, weight, target = H.linear_inputs(rows, dim, vocab, dtype, gen, BLOCK_BYTES)
    ignored = torch.rand(rows, device=device, generator=gen) < 1 / 16
    return hidden, weight, target.masked_fill(ignored, IGNORE)


def lce_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> dict[str, float]:
    """Float64 statistics of the logits ``hidden @ weight.T``, materialised in float64 a slice of
    rows at a time, and the gradient errors ``max |g - g_ref| / max |g_ref|`` of the mean loss
    for ``hidden`` and ``weight`` (``nan`` when that gradient is missing)."""
    ref = _reference.reference_linear_cross_entropy_rows(
        hidden, weight, target, ignore_index=IGNORE, block_bytes=512 * MiB
    )
    errors = {}
    for key, grad, grad_ref in (
        ("grad_h_err", grad_h, ref.pop("grad_hidden")),
        ("grad_w_err", grad_w, ref.pop("grad_weight")),
    ):
        if grad is None:
            errors[key] = float("nan")
        else:
            err, top = _reference.max_abs_errors(grad, grad_ref, block_bytes=512 * MiB)
            errors[key] = err / max(top, 1e-300)
        del grad_ref
    return {**ref, **errors}


def _lce_tolerances(backend: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative tolerances of the linear cross-entropy checks.

    The Triton path (and the torch path in float32) computes the logits in float32 from the
    inputs' values, so the sums match float64 to float32 accuracy; a near-tie may flip an argmax
    (``correct``). Its bf16 gradients are rounded to bf16 twice (the logits' gradient tile before
    its matmuls, the results at the end): ``max |g - g_ref| / max |g_ref|`` <= 1e-2. The torch
    backend rounds bf16 logits to bf16 before scoring them (as the model's own head computes
    them): an error of up to ``2**-9 |z|`` per logit, hence its looser bf16 bounds.
    """
    tol = {**STAT_TOLERANCES, "correct": 1e-3, "grad_h_err": 1e-5, "grad_w_err": 1e-5}
    if dtype == torch.bfloat16:
        tol["grad_h_err"] = tol["grad_w_err"] = 1e-2
        if backend == "torch":
            for key in ("loss", "nll_sum", "entropy_sum", "lse_sq_sum"):
                tol[key] = 2.0**-8
            tol["perplexity"] = 2.0**-5
            tol["correct"] = 5e-2
    return tol


def check_lce_case(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, backend: str
) -> list[Check]:
    """``lossplug.linear_cross_entropy`` forward + backward with stats against float64."""
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    try:
        loss, stats = lossplug.linear_cross_entropy(
            hidden, weight, target, return_stats=True, backend=backend
        )
        loss.backward()
        with torch.no_grad():
            ref = lce_reference(hidden.detach(), weight.detach(), target, hidden.grad, weight.grad)
    except Exception as exc:  # one failing case must not end the suite
        traceback.print_exc(limit=3)
        message = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        return [Check(name, message, float("nan"), float("nan"), float("inf"), 0.0)]
    finally:
        hidden.grad = weight.grad = None
        hidden.requires_grad_(False)
        weight.requires_grad_(False)
    tol = _lce_tolerances(backend, hidden.dtype)
    checks = stat_checks(name, loss, stats, ref, tol)
    for key, what in (("grad_h_err", "hidden"), ("grad_w_err", "weight")):
        err = ref[key]
        checks.append(Check(name, f"grad {what} (max err / max ref)", err, 0.0, err, tol[key]))
    return checks


def run_lce_correctness(device: torch.device, tiny: bool) -> list[Check]:
    """bf16 and fp32 at an odd moderate shape, Triton backend; under ``--tiny`` both backends
    (Triton interpreted) at a tiny odd shape."""
    rows, dim, vocab = (67, 40, 301) if tiny else LCE_CHECK_SHAPE
    backends = ("torch", "triton") if tiny else ("triton",)
    checks: list[Check] = []
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hidden, weight, target = make_lce_inputs(rows, dim, vocab, device, seed=5, dtype=dtype)
        for backend in backends:
            name = f"linear {label} N={rows} D={dim} V={vocab} {backend}"
            checks += check_lce_case(name, hidden, weight, target, backend)
            H.free(device)
        del hidden, weight, target
        H.free(device)
    return checks


def _materialised_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss as models write it: the logits in memory, upcast, then cross-entropy."""
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE)


def _lce_anchor_builders(
    tiny: bool, compile_: bool
) -> dict[str, Callable[[], Callable[..., torch.Tensor]]]:
    """Each implementation's builder: returns ``fn(hidden, weight, target) -> loss`` or raises
    (not installed, unsupported here), which the table shows as n/a."""

    def lossplug_fn(backend: str) -> Callable[[], Callable[..., torch.Tensor]]:
        def build() -> Callable[..., torch.Tensor]:
            return lambda h, w, y: lossplug.linear_cross_entropy(h, w, y, backend=backend)

        return build

    def compiled() -> Callable[..., torch.Tensor]:
        if not compile_:
            raise RuntimeError("skipped (--no-compile)")
        return torch.compile(_materialised_ce)

    def flce_chunked() -> Callable[..., torch.Tensor]:
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=options)

    def cce() -> Callable[..., torch.Tensor]:
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE)

    def liger() -> Callable[..., torch.Tensor]:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss,
            )
        except ImportError:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        return lambda h, w, y: loss_fn(w, h, y)  # Liger takes the weight first

    return {
        # on the CPU smoke run the Triton row runs the torch backend (see its note)
        "lossplug (triton)": lossplug_fn("torch" if tiny else "triton"),
        "lossplug (torch backend)": lossplug_fn("torch"),
        "torch eager materialised (.float())": lambda: _materialised_ce,
        "torch.compile materialised (.float())": compiled,
        "F.linear_cross_entropy chunked (auto)": flce_chunked,
        "CCE linear_cross_entropy (cce)": cce,
        "Liger FusedLinearCrossEntropyLoss": liger,
    }


def run_lce_timings(
    device: torch.device, tiny: bool, repeats: int, compile_: bool
) -> tuple[list[Timing], str]:
    """fwd + bwd (gradients of hidden and weight) of every implementation on one bf16 shape;
    returns the timings and the shape's label."""
    rows, dim, vocab = (256, 64, 1000) if tiny else LCE_TIMING_SHAPE
    warmup = 1 if tiny else 3
    hidden, weight, target = make_lce_inputs(rows, dim, vocab, device, seed=6)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    floor_ms = 6 * rows * dim * vocab / PEAK_FLOPS * 1e3

    def reset() -> None:
        hidden.grad = weight.grad = None

    results: list[Timing] = []
    for impl, build in _lce_anchor_builders(tiny, compile_).items():
        timing = Timing(impl, "fwd+bwd", floor_ms=floor_ms, section="linear_cross_entropy")
        if tiny and impl == "lossplug (triton)":
            timing.note = "torch backend on the CPU (--tiny)"
        results.append(timing)
        try:
            fn = build()

            def run(fn: Callable[..., torch.Tensor] = fn) -> object:
                loss = fn(hidden, weight, target)
                loss.backward()
                return loss

            timing.times_ms, timing.peak_extra_bytes = H.time_on_device(
                run, reset, device, repeats, warmup
            )
        except Exception as exc:  # not installed, or unsupported on this device
            timing.note = _na(exc)
            if not isinstance(exc, ImportError):
                traceback.print_exc(limit=2)
        reset()
        H.free(device)
    return results, f"N={rows} D={dim} V={vocab}"


def format_lce_timings(results: list[Timing], shape: str) -> str:
    """Time, floor ratio, peak extra memory, lossplug ÷ each anchor, and the DESIGN.md target."""
    ours = results[0] if results else None
    cce = next((t for t in results if t.impl.startswith("CCE")), None)
    lines = [
        f"bf16 {shape}, fwd + bwd w.r.t. hidden and weight; floor = 6·N·D·V FLOP at "
        f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s; peak extra = max_memory_allocated above the inputs "
        f"(gradients included); ratios = {ours.impl if ours else 'lossplug'} ÷ that row",
        "",
    ]
    head = ["impl", "median ms", "floor ms", "x floor", "peak extra MiB"]
    head += ["lossplug time ratio", "lossplug mem ratio", "target", "note"]
    rows = []
    for t in results:
        peak, ratios, target = t.peak_extra_bytes, ["—", "—"], ""
        if t is not ours and ours is not None:  # a zero or missing number has no ratio
            if ours.median_ms is not None and t.median_ms:
                ratios[0] = H.ratio(ours.median_ms, t.median_ms)
            if ours.peak_extra_bytes is not None and peak:
                ratios[1] = H.ratio(ours.peak_extra_bytes, peak)
        if t is ours and t.x_floor is not None:
            target = f"<= {TARGET_LCE_FLOOR}x floor: {_yes(t.x_floor <= TARGET_LCE_FLOOR)}"
            if cce is not None and cce.peak_extra_bytes and peak is not None:
                target += f"; mem <= CCE: {_yes(peak <= cce.peak_extra_bytes)}"
        cells = [t.impl, H.fmt(t.median_ms, ".3f"), f"{t.floor_ms:.3g}", H.fmt(t.x_floor, ".3g")]
        rows.append([*cells, H.mib(peak), *ratios, target, t.note])
    return "\n".join(lines + H.markdown_table(head, rows))


# ----------------------------------------------------------------------------------------------
# report


def _na(exc: BaseException) -> str:
    """Why a row has no number: the exception's type and last line, fit for a table cell."""
    text = str(exc).strip()
    last = text.splitlines()[-1].replace("|", "/") if text else ""
    return f"n/a ({type(exc).__name__}: {last[:100]})"


def _yes(ok: bool) -> str:
    """A target cell's answer (the PASS/FAIL lines are :func:`target_lines`)."""
    return "yes" if ok else "NO"


def environment(device: torch.device) -> dict[str, str]:
    """The machine, the device and the library versions of the anchors."""
    import triton

    return H.machine_info(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        triton=triton.__version__,
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"),
        **{name: H.version_of(name) for name in ("liger-kernel", "cut-cross-entropy")},
    )


def format_checks(checks: list[Check]) -> str:
    head = ["case", "quantity", "lossplug", "float64 ref", "rel err", "tol", "ok"]
    rows = []
    for c in checks:
        cells = [c.case, c.quantity, f"{c.value:.9g}", f"{c.reference:.9g}", f"{c.error:.2e}"]
        rows.append([*cells, f"{c.tolerance:.0e}", "PASS" if c.ok else "FAIL"])
    return "\n".join(H.markdown_table(head, rows))


def format_timings(results: list[Timing], shape: str) -> str:
    """Final table: time, floor ratio, peak extra memory, and the DESIGN.md target verdicts."""
    liger = next((t for t in results if t.impl.startswith("liger") and t.mode == "fwd+bwd"), None)
    head = ["impl", "mode", "median ms", "floor ms", "x floor", "peak extra MiB", "target", "note"]
    rows = []
    for t in results:
        target = ""
        if t.impl == "lossplug-triton" and t.x_floor is not None:
            if t.mode == "fwd+bwd":
                target = f"<= {TARGET_FWD_BWD}x: {_yes(t.x_floor <= TARGET_FWD_BWD)}"
                if liger is not None and liger.median_ms is not None:
                    target += f"; < liger: {_yes(t.median_ms < liger.median_ms)}"
            elif t.mode == "stats":
                target = f"<= {TARGET_STATS}x: {_yes(t.x_floor <= TARGET_STATS)}"
        cells = [t.impl, t.mode, H.fmt(t.median_ms, ".3f"), f"{t.floor_ms:.3g}"]
        rows.append([*cells, H.fmt(t.x_floor, ".3g"), H.mib(t.peak_extra_bytes), target, t.note])
    title = f"bf16 {shape}; floor = logits bytes read (+ written) at 3.0 TB/s"
    return "\n".join([title, "", *H.markdown_table(head, rows)])


def target_lines(
    checks: list[Check], lce_checks: list[Check], timings: list[Timing], tiny: bool
) -> list[str]:
    """One ``PASS``/``FAIL``/``N/A``/``SKIP`` line per target, with the number behind it."""
    lines = []
    skip = " (--tiny: CPU wall clock)"  # GPU floors say nothing of CPU times

    def add(label: str, ok: bool | None, detail: str) -> None:
        """``detail``: ``": the number"``, or ``" (why there is none)"``."""
        lines.append(f"{'SKIP' if detail == skip else H.pass_fail(ok)}  {label}{detail}")

    for name, group in (("cross-entropy", checks), ("linear cross-entropy", lce_checks)):
        if group:
            good = sum(c.ok for c in group)
            add(f"correctness {name}", good == len(group), f": {good}/{len(group)} checks")

    def find(impl: str, mode: str = "fwd+bwd") -> Timing | None:
        return next((t for t in timings if t.impl == impl and t.mode == mode), None)

    def timed(label: str, t: Timing | None, limit: float) -> None:
        if t is None:
            return
        if tiny:
            add(label, None, skip)
        elif t.x_floor is None:
            add(label, None, f" ({t.note or 'not run'})")
        else:
            add(label, t.x_floor <= limit, f": {t.x_floor:.2f}x floor")

    timed(f"CE fwd+bwd <= {TARGET_FWD_BWD}x floor", find("lossplug-triton"), TARGET_FWD_BWD)
    timed(f"CE stats <= {TARGET_STATS}x floor", find("lossplug-triton", "stats"), TARGET_STATS)
    ours, liger = find("lossplug-triton"), find("liger CrossEntropyLoss")
    if ours is not None and liger is not None:
        label = "CE fwd+bwd faster than Liger CE"
        if tiny:
            add(label, None, skip)
        elif ours.median_ms is None or liger.median_ms is None:
            add(label, None, f" ({(liger.note or ours.note) or 'not run'})")
        else:
            faster = ours.median_ms < liger.median_ms
            add(label, faster, f": {ours.median_ms:.3f} vs {liger.median_ms:.3f} ms")
    cce = find("CCE linear_cross_entropy (cce)")
    for impl in ("lossplug (torch backend)", "lossplug (triton)"):
        t = find(impl)
        timed(f"linear CE fwd+bwd {impl} <= {TARGET_LCE_FLOOR}x floor", t, TARGET_LCE_FLOOR)
        if t is None or tiny:
            continue
        label = f"linear CE peak extra memory {impl} <= CCE's"
        if t.peak_extra_bytes is None or cce is None or cce.peak_extra_bytes is None:
            add(label, None, f" ({cce.note if cce is not None else 'CCE not run'})")
        else:
            ok = t.peak_extra_bytes <= cce.peak_extra_bytes
            add(label, ok, f": {H.mib(t.peak_extra_bytes)} vs {H.mib(cce.peak_extra_bytes)} MiB")
    return lines


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
