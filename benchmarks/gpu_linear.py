"""The linear cross-entropy section of the GPU suite (``lossplug.linear_cross_entropy``, hidden
``[N, D]`` and weight ``[V, D]``, the ``[N, V]`` logits never held): its inputs, the float64
reference with materialised logits, the correctness checks and their tolerances, the timings of
lossplug and its anchors against the FLOP floor, and their table."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import _harness as H
import torch
import torch.nn.functional as F
from _harness import IGNORE, MiB
from gpu_targets import (
    BLOCK_BYTES,
    STAT_TOLERANCES,
    TARGET_LCE_FLOOR,
    Check,
    Timing,
    na_note,
    stat_checks,
    yes_no,
)

import _reference
import lossplug

# linear cross-entropy: FLOP floor 6·N·D·V (forward matmul, two backward matmuls) at this rate
PEAK_FLOPS = 800e12
LCE_TIMING_SHAPE = (8192, 4096, 128256)  # N, D, V
LCE_CHECK_SHAPE = (4099, 2040, 50257)


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
            timing.note = na_note(exc)
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
            target = f"<= {TARGET_LCE_FLOOR}x floor: {yes_no(t.x_floor <= TARGET_LCE_FLOOR)}"
            if cce is not None and cce.peak_extra_bytes and peak is not None:
                target += f"; mem <= CCE: {yes_no(peak <= cce.peak_extra_bytes)}"
        cells = [t.impl, H.fmt(t.median_ms, ".3f"), f"{t.floor_ms:.3g}", H.fmt(t.x_floor, ".3g")]
        rows.append([*cells, H.mib(peak), *ratios, target, t.note])
    return "\n".join(lines + H.markdown_table(head, rows))
