"""TokenStats arithmetic and the FusedCrossEntropyLoss module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lossplug
from _reference import reference_cross_entropy
from lossplug import TokenStats


def batches(n=3, shape=(4, 9, 77), seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = torch.randn(shape, generator=gen) * 2
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        target[torch.rand(shape[:-1], generator=gen) < 0.3] = -100
        yield logits, target


def test_merged_stats_give_the_perplexity_of_everything_seen():
    data = list(batches())
    merged = sum(lossplug.cross_entropy(x, t, return_stats=True)[1] for x, t in data)
    all_logits = torch.cat([x for x, _ in data])
    all_target = torch.cat([t for _, t in data])
    _, ref = reference_cross_entropy(all_logits, all_target)
    assert int(merged.tokens) == int(ref["tokens"])
    torch.testing.assert_close(merged.mean_nll, ref["nll_sum"] / ref["tokens"], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        merged.perplexity, torch.exp(ref["nll_sum"] / ref["tokens"]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        merged.entropy, ref["entropy_sum"] / ref["tokens"], rtol=1e-6, atol=0
    )
    assert float(merged.accuracy) == int(ref["correct"]) / int(ref["tokens"])
    # the mean of per-batch perplexities is not the perplexity of the stream
    per_batch = [lossplug.cross_entropy(x, t, return_stats=True)[1].perplexity for x, t in data]
    assert not math.isclose(float(sum(per_batch) / len(per_batch)), float(merged.perplexity))


def test_zeros_is_neutral_and_fields_keep_their_dtypes():
    _, stats = lossplug.cross_entropy(*next(batches()), return_stats=True)
    total = TokenStats.zeros() + stats
    for name, value in stats.as_dict().items():
        assert torch.equal(getattr(total, name), value)
        assert getattr(total, name).dtype == value.dtype
    empty = TokenStats.zeros()
    assert math.isnan(float(empty.perplexity)) and math.isnan(float(empty.accuracy))
    assert stats.detach().to("cpu").device == torch.device("cpu")
    assert float(stats.mean_lse_sq) > 0


def test_module_is_a_drop_in_for_cross_entropy_loss():
    logits, target = next(batches(shape=(12, 50)))
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    ours = lossplug.FusedCrossEntropyLoss(label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    a, b = ours(x1, target), theirs(x2, target)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-7)
    assert int(ours.last_stats.tokens) == int((target != -100).sum())
    assert "label_smoothing=0.1" in repr(ours)


def test_module_on_sequences_with_shift_keeps_the_last_stats():
    criterion = lossplug.FusedCrossEntropyLoss(shift=True, z_loss=1e-4)
    assert criterion.last_stats is None
    for logits, target in batches(2):
        loss = criterion(logits, target)
        want, ref = reference_cross_entropy(logits, target, shift=True, z_loss=1e-4)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
        assert int(criterion.last_stats.tokens) == int(ref["tokens"])
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 77), target[:, 1:].reshape(-1))
    assert abs(float(criterion.last_stats.mean_nll) - float(plain)) < 1e-5


def test_modules_take_float64_like_torch_losses():
    """float64 in, float64 loss and gradients out, equal to nn.CrossEntropyLoss in float64."""
    logits, target = next(batches(shape=(12, 50)))
    logits = logits.double()
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = lossplug.FusedCrossEntropyLoss(label_smoothing=0.1)
    a, b = ours(x1, target), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(x2, target)
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert ours.last_stats.nll_sum.dtype == torch.float64
    assert ours.last_stats.tokens.dtype == torch.int64

    hidden = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, dtype=torch.float64)
    fused = lossplug.FusedLinearCrossEntropyLoss()(hidden, head.weight, target, head.bias)
    plain = F.cross_entropy(head(hidden), target)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-12, atol=1e-12)
