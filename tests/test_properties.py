"""Property-based tests: any shape, dtype, option and ignore pattern agrees with float64."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossplug
from _reference import reference_cross_entropy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def problems(draw, max_rows: int):
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    while len(lead) > 1 and torch.Size(lead).numel() > max_rows:
        lead.pop()
    vocab = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([0.0, 1.0, 8.0, 40.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn((*lead, vocab), generator=gen, dtype=torch.float64) * scale).to(
        DTYPES[dtype]
    )
    target = torch.randint(0, vocab, lead, generator=gen)
    ignore_share = draw(st.sampled_from([0.0, 0.5, 1.0]))
    target[torch.rand(lead, generator=gen) < ignore_share] = -100
    options = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-4])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
        shift=draw(st.booleans()),
    )
    return logits, target, options


def check(logits, target, options, backend):
    x = logits.clone().requires_grad_()
    loss, stats = lossplug.cross_entropy(x, target, backend=backend, return_stats=True, **options)
    x_ref = logits.clone().requires_grad_()
    ref_loss, ref_stats = reference_cross_entropy(x_ref, target, **options)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=2e-6)
    assert int(stats.tokens) == int(ref_stats["tokens"])
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(
            getattr(stats, name), ref_stats[name], rtol=1e-5, atol=2e-5, msg=name
        )
    assert torch.isfinite(loss).all()
    grad_out = torch.ones_like(ref_loss)
    loss.backward(grad_out.float())
    ref_loss.backward(grad_out)
    rtol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[logits.dtype]
    atol = 2e-6
    if backend == "triton":
        # its backward takes p = e^(z - lse) with the forward's float32 lse, rounded to half an
        # ulp at the logits' magnitude: that much absolute error at a confident target (p - 1)
        atol += 2.0**-24 * float(logits.float().abs().max()) * 2
    torch.testing.assert_close(
        x.grad.double(), x_ref.grad.to(logits.dtype).double(), rtol=rtol, atol=atol
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_rows=60))
def test_torch_backend_matches_reference(problem):
    check(*problem, backend="torch")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_rows=12))
def test_triton_backend_matches_reference(problem):
    check(*problem, backend="triton")
