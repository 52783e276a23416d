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

``--quick`` (under 3 minutes on an H100) leaves out the ``N * V > 2**31`` case and
``torch.compile``, and times 5 calls instead of 20.

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
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

if "--tiny" in sys.argv[1:]:
    # Triton reads this when a kernel is defined, i.e. when lossplug's kernel module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

import lossplug

# the float64 references live with the tests (tests/_reference.py); the benchmarks import them
_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
import _reference  # noqa: E402

IGNORE = -100
MiB = 2**20
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
    step = max(1, (256 * MiB) // (4 * vocab))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        z = torch.randn(stop - start, vocab, device=device, generator=gen).mul_(2.0)
        bump = torch.rand(stop - start, device=device, generator=gen).mul_(14.0)
        z[torch.arange(stop - start, device=device), target[start:stop]] += bump
        logits[start:stop].copy_(z)
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

    got = {
        "loss": float(loss.detach()),
        "nll_sum": float(stats.nll_sum),
        "tokens": float(stats.tokens),
        "correct": float(stats.correct),
        "entropy_sum": float(stats.entropy_sum),
        "lse_sq_sum": float(stats.lse_sq_sum),
    }
    # relative tolerances; perplexity's 1e-4 is the DESIGN.md rule, the sums can do better
    tolerances = {
        "loss": 1e-5,
        "nll_sum": 1e-5,
        "tokens": 0.0,
        "correct": 0.0,
        "entropy_sum": 1e-4,
        "lse_sq_sum": 1e-5,
    }
    checks = [
        Check(name, key, got[key], ref[key], _rel(got[key], ref[key]), tolerances[key])
        for key in tolerances
    ]
    ppl, ppl_ref = float(stats.perplexity), float(torch.tensor(ref["loss"]).double().exp())
    checks.append(Check(name, "perplexity", ppl, ppl_ref, _rel(ppl, ppl_ref), 1e-4))
    excess = ref["grad_excess"]
    checks.append(Check(name, "grad (worst err / bound)", excess, 1.0, excess, 1.0))
    if shift:
        checks.append(Check(name, "grad at unscored tail", tail_grad, 0.0, tail_grad, 0.0))
    return checks


def _rel(value: float, reference: float) -> float:
    if reference == value:
        return 0.0
    return abs(value - reference) / max(abs(reference), 1e-30)


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
    _free(device)

    if not quick:
        logits, target = make_inputs(*huge, device, seed=2)
        label = f"bf16 {huge[0]}x{huge[1]}"
        if logits.numel() > 2**31:
            label += " (N*V > 2^31)"
        checks += check_case(label, logits, target)
        del logits, target
        _free(device)

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
    _free(device)
    return checks


# ----------------------------------------------------------------------------------------------
# timing


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(
    run: Callable[[], object],
    reset: Callable[[], None],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[list[float], int | None]:
    """Times of ``run`` in ms (CUDA events on a GPU, wall clock otherwise) and its peak memory.

    ``reset`` runs between calls, outside the timed region (dropping gradients, restoring
    clobbered inputs). The peak is measured on one call after the warm-up (compilation and
    autotuning are done by then), above what was allocated before it.
    """
    for _ in range(warmup):
        run()
        reset()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        reset()
    times = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        reset()
    return times, peak


def _liger_loss() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str]:
    """Liger-Kernel's cross-entropy module, or None and why it is not available."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception as exc:  # not installed, or an import that needs what is not here
        return None, f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"
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
                timing.times_ms, timing.peak_extra_bytes = time_call(
                    run, reset, device, repeats, warmup
                )
            except Exception as exc:  # e.g. torch.compile without a working C++ toolchain
                timing.note = f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
                traceback.print_exc(limit=2)
            logits.requires_grad_(False)
            logits.grad = None
            _free(device)
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
    """``hidden [rows, dim]``, ``weight [vocab, dim]`` and targets, built in slices.

    ``weight`` is ``2 randn / sqrt(dim)`` (logits of standard deviation about 2); each hidden row
    is ``randn`` plus a random multiple in ``[0, 14)`` of ``weight[y] / |weight[y]|^2``, which
    lifts the logit of its target by that much, so the true class is often near the top as with
    a trained model; one row in sixteen is ignored.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.empty(vocab, dim, device=device, dtype=dtype)
    step = max(1, (256 * MiB) // (4 * dim))
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        w = torch.randn(stop - start, dim, device=device, generator=gen)
        weight[start:stop].copy_(w.mul_(2.0 / dim**0.5))
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    hidden = torch.empty(rows, dim, device=device, dtype=dtype)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w_true = weight.index_select(0, target[start:stop]).float()  # the rounded values
        bump = torch.rand(stop - start, device=device, generator=gen).mul_(14.0)
        h = torch.randn(stop - start, dim, device=device, generator=gen)
        h.addcmul_(w_true, (bump / w_true.square().sum(dim=1))[:, None])
        hidden[start:stop].copy_(h)
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
    tol = {
        "loss": 1e-5,
        "nll_sum": 1e-5,
        "tokens": 0.0,
        "correct": 1e-3,
        "entropy_sum": 1e-4,
        "lse_sq_sum": 1e-5,
        "perplexity": 1e-4,
        "grad_h_err": 1e-5,
        "grad_w_err": 1e-5,
    }
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
    got = {
        "loss": float(loss.detach()),
        "nll_sum": float(stats.nll_sum),
        "tokens": float(stats.tokens),
        "correct": float(stats.correct),
        "entropy_sum": float(stats.entropy_sum),
        "lse_sq_sum": float(stats.lse_sq_sum),
    }
    tol = _lce_tolerances(backend, hidden.dtype)
    checks = [Check(name, k, got[k], ref[k], _rel(got[k], ref[k]), tol[k]) for k in got]
    ppl, ppl_ref = float(stats.perplexity), float(torch.tensor(ref["loss"]).double().exp())
    checks.append(Check(name, "perplexity", ppl, ppl_ref, _rel(ppl, ppl_ref), tol["perplexity"]))
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
            _free(device)
        del hidden, weight, target
        _free(device)
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

            timing.times_ms, timing.peak_extra_bytes = time_call(
                run, reset, device, repeats, warmup
            )
        except Exception as exc:  # not installed, or unsupported on this device
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            last = last.replace("|", "/")  # a table cell
            timing.note = f"n/a ({type(exc).__name__}: {last[:100]})"
            if not isinstance(exc, ImportError):
                traceback.print_exc(limit=2)
        reset()
        _free(device)
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
        "| impl | median ms | floor ms | x floor | peak extra MiB | lossplug time ratio | "
        "lossplug mem ratio | target | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results:
        med = t.median_ms
        x_floor = None if med is None else med / t.floor_ms
        peak = t.peak_extra_bytes
        t_ratio = m_ratio = "—"
        if t is not ours and ours is not None:
            if ours.median_ms is not None and med:
                t_ratio = f"{ours.median_ms / med:.2f}x"
            if ours.peak_extra_bytes is not None and peak:
                m_ratio = f"{ours.peak_extra_bytes / peak:.2f}x"
        target = ""
        if t is ours and x_floor is not None:
            within = x_floor <= TARGET_LCE_FLOOR
            target = f"<= {TARGET_LCE_FLOOR}x floor: {'yes' if within else 'NO'}"
            if cce is not None and cce.peak_extra_bytes and peak is not None:
                target += f"; mem <= CCE: {'yes' if peak <= cce.peak_extra_bytes else 'NO'}"
        lines.append(
            f"| {t.impl} | {'n/a' if med is None else f'{med:.3f}'} | {t.floor_ms:.3g} | "
            f"{'n/a' if x_floor is None else f'{x_floor:.3g}'} | "
            f"{'n/a' if peak is None else f'{peak / MiB:.0f}'} | {t_ratio} | {m_ratio} | "
            f"{target} | {t.note} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# report


def environment(device: torch.device) -> dict[str, str]:
    """Device name and library versions."""
    import triton

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "lossplug": lossplug.__version__,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for name, module in (
        ("liger-kernel", "liger_kernel"),
        ("cut-cross-entropy", "cut_cross_entropy"),
    ):
        try:
            from importlib.metadata import version

            __import__(module)
            info[name] = version(name)
        except Exception:
            info[name] = "not installed"
    return info


def format_checks(checks: list[Check]) -> str:
    lines = [
        "| case | quantity | lossplug | float64 ref | rel err | tol | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.case} | {c.quantity} | {c.value:.9g} | {c.reference:.9g} | {c.error:.2e} | "
            f"{c.tolerance:.0e} | {'PASS' if c.ok else 'FAIL'} |"
        )
    return "\n".join(lines)


def format_timings(results: list[Timing], shape: str) -> str:
    """Final table: time, floor ratio, peak extra memory, and the DESIGN.md target verdicts."""
    liger_fb = next(
        (t.median_ms for t in results if t.impl.startswith("liger") and t.mode == "fwd+bwd"), None
    )
    lines = [
        f"bf16 {shape}; floor = logits bytes read (+ written) at 3.0 TB/s",
        "",
        "| impl | mode | median ms | floor ms | x floor | peak extra MiB | target | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results:
        med = t.median_ms
        ratio = None if med is None else med / t.floor_ms
        target = ""
        if t.impl == "lossplug-triton" and ratio is not None:
            if t.mode == "fwd+bwd":
                target = f"<= {TARGET_FWD_BWD}x: {'yes' if ratio <= TARGET_FWD_BWD else 'NO'}"
                if liger_fb is not None:
                    target += f"; < liger: {'yes' if med < liger_fb else 'NO'}"
            elif t.mode == "stats":
                target = f"<= {TARGET_STATS}x: {'yes' if ratio <= TARGET_STATS else 'NO'}"
        peak = "n/a" if t.peak_extra_bytes is None else f"{t.peak_extra_bytes / MiB:.0f}"
        lines.append(
            f"| {t.impl} | {t.mode} | {'n/a' if med is None else f'{med:.3f}'} | "
            f"{t.floor_ms:.3g} | {'n/a' if ratio is None else f'{ratio:.3g}'} | {peak} | "
            f"{target} | {t.note} |"
        )
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "N/A " if ok is None else "PASS" if ok else "FAIL"


def target_lines(
    checks: list[Check], lce_checks: list[Check], timings: list[Timing], tiny: bool
) -> list[str]:
    """One ``PASS``/``FAIL``/``N/A``/``SKIP`` line per target, with the number behind it."""
    lines = []
    for name, group in (("cross-entropy", checks), ("linear cross-entropy", lce_checks)):
        if group:
            bad = sum(not c.ok for c in group)
            verdict = _verdict(bad == 0)
            lines.append(f"{verdict}  correctness {name}: {len(group) - bad}/{len(group)} checks")

    def median(impl: str, mode: str = "fwd+bwd") -> Timing | None:
        return next((t for t in timings if t.impl == impl and t.mode == mode), None)

    def timed(label: str, t: Timing | None, limit: float) -> None:
        if t is None:
            return
        if tiny:
            lines.append(f"SKIP  {label} (--tiny: CPU wall clock)")
        elif t.median_ms is None:
            lines.append(f"N/A   {label} ({t.note or 'not run'})")
        else:
            ratio = t.median_ms / t.floor_ms
            lines.append(f"{_verdict(ratio <= limit)}  {label}: {ratio:.2f}x floor")

    timed(f"CE fwd+bwd <= {TARGET_FWD_BWD}x floor", median("lossplug-triton"), TARGET_FWD_BWD)
    timed(f"CE stats <= {TARGET_STATS}x floor", median("lossplug-triton", "stats"), TARGET_STATS)
    ours, liger = median("lossplug-triton"), median("liger CrossEntropyLoss")
    if ours is not None and liger is not None:
        label = "CE fwd+bwd faster than Liger CE"
        if tiny:
            lines.append(f"SKIP  {label} (--tiny: CPU wall clock)")
        elif ours.median_ms is None or liger.median_ms is None:
            lines.append(f"N/A   {label} ({(liger.note or ours.note) or 'not run'})")
        else:
            ok = ours.median_ms < liger.median_ms
            lines.append(
                f"{_verdict(ok)}  {label}: {ours.median_ms:.3f} vs {liger.median_ms:.3f} ms"
            )
    cce = median("CCE linear_cross_entropy (cce)")
    for impl in ("lossplug (torch backend)", "lossplug (triton)"):
        t = median(impl)
        timed(f"linear CE fwd+bwd {impl} <= {TARGET_LCE_FLOOR}x floor", t, TARGET_LCE_FLOOR)
        if t is None or tiny:
            continue
        label = f"linear CE peak extra memory {impl} <= CCE's"
        if t.peak_extra_bytes is None or cce is None or cce.peak_extra_bytes is None:
            lines.append(f"N/A   {label} ({cce.note if cce is not None else 'CCE not run'})")
        else:
            ok = t.peak_extra_bytes <= cce.peak_extra_bytes
            mib = f"{t.peak_extra_bytes / MiB:.0f} vs {cce.peak_extra_bytes / MiB:.0f} MiB"
            lines.append(f"{_verdict(ok)}  {label}: {mib}")
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
        help="under 3 minutes: no N*V > 2**31 case, no torch.compile, 5 timed calls",
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
    print("# lossplug GPU suite\n")
    print("- " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; command: python {shlex.join(sys.argv)}")
    timing_clock = "CUDA events" if device.type == "cuda" else "wall clock"
    print(f"- timing: median of {repeats} calls ({timing_clock})\n", flush=True)

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
        _free(device)

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
