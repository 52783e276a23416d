"""The fused linear cross-entropy against float64 materialised logits: loss, stats, 3 gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lossplug
import lossplug.ops._torch.linear_cross_entropy as torch_lce
from _reference import reference_cross_entropy, reference_linear_cross_entropy

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the loss and statistics are computed in float32 after the matmul; half inputs round the logits
# to their dtype on the torch path (as the model's own output layer does), hence looser bounds
LOSS_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=2e-2),
}
# relative Frobenius error of each gradient against float64
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
VOCAB, DIM = 203, 24
SHAPE = (3, 37)  # odd token counts: partial tiles and chunks everywhere

OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=4.0),
    "shift": dict(shift=True),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "everything": dict(
        label_smoothing=0.05, z_loss=1e-4, softcap=6.0, shift=True, reduction="none"
    ),
}


def make_inputs(dtype, *, shape=SHAPE, vocab=VOCAB, dim=DIM, bias=True, ignore_share=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    target = torch.randint(0, vocab, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < ignore_share] = -100
    return hidden, weight, b, target


def run_both(hidden, weight, bias, target, backend, **kw):
    """Loss, stats and the three gradients from lossplug and from the float64 reference."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, stats = lossplug.linear_cross_entropy(
        leaves[0], leaves[1], target, bias=leaves[2], backend=backend, return_stats=True, **kw
    )
    ref_leaves = [
        t.double().clone().requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    ref_loss, ref_stats = reference_linear_cross_entropy(
        ref_leaves[0], ref_leaves[1], target, bias=ref_leaves[2], **kw
    )
    grad_out = torch.randn(
        loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    loss.backward(grad_out.to(loss.dtype))
    ref_loss.backward(grad_out)
    grads = [t.grad if t is not None else None for t in leaves]
    ref_grads = [t.grad if t is not None else None for t in ref_leaves]
    return loss, stats, grads, ref_loss, ref_stats, ref_grads


def assert_grad_close(got, want, tol, name):
    assert got.dtype != torch.float64
    err = (got.double() - want).norm() / want.norm().clamp(min=1e-30)
    assert float(err) <= tol, f"{name}: relative error {float(err):.2e} > {tol:.1e}"


def assert_stats(stats, ref, dtype):
    assert int(stats.tokens) == int(ref["tokens"])
    if dtype == torch.float32:
        assert int(stats.correct) == int(ref["correct"])
    tol = LOSS_TOL[dtype]
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(
            getattr(stats, name),
            ref[name],
            rtol=tol["rtol"],
            atol=tol["atol"] * max(1, int(ref["tokens"])),
            msg=name,
        )


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, dtype, option):
    kw = OPTIONS[option]
    hidden, weight, bias, target = make_inputs(dtype)
    loss, stats, grads, ref_loss, ref_stats, ref_grads = run_both(
        hidden, weight, bias, target, backend, **kw
    )
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss.detach(), **LOSS_TOL[dtype])
    assert_stats(stats, ref_stats, dtype)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert_grad_close(got, want, GRAD_TOL[dtype], name)


@pytest.mark.parametrize(("workspace_bytes", "block_bytes"), [(4096, 4096), (64 * 1024, 8192)])
def test_torch_path_chunks_give_the_same_result(workspace_bytes, block_bytes, monkeypatch):
    """Small chunks and blocks (a few rows each, ignored rows among them) change nothing."""
    hidden, weight, bias, target = make_inputs(torch.float32, shape=(5, 41), ignore_share=0.4)
    whole = run_both(hidden, weight, bias, target, "torch", z_loss=1e-3, shift=True)
    monkeypatch.setattr(torch_lce, "WORKSPACE_BYTES", workspace_bytes)
    monkeypatch.setattr(torch_lce, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(torch_lce, "MIN_CHUNK_ROWS", 1)
    chunked = run_both(hidden, weight, bias, target, "torch", z_loss=1e-3, shift=True)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked[2], whole[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_grad_close(chunked[2][1], chunked[5][1], GRAD_TOL[torch.float32], "weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_cross_entropy_of_materialised_logits(backend):
    """The same keywords as lossplug.cross_entropy, the same numbers (float32)."""
    hidden, weight, bias, target = make_inputs(torch.float32, shape=(2, 19))
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, shift=True)
    loss, stats = lossplug.linear_cross_entropy(
        hidden, weight, target, bias=bias, backend=backend, return_stats=True, **kw
    )
    want, want_stats = lossplug.cross_entropy(
        F.linear(hidden, weight, bias), target, backend="torch", return_stats=True, **kw
    )
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(
            getattr(stats, name), getattr(want_stats, name), rtol=1e-5, atol=1e-5
        )
    assert int(stats.tokens) == int(want_stats.tokens)
    assert int(stats.correct) == int(want_stats.correct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_stats_is_the_same(backend):
    """Without return_stats the argmax and entropy are skipped; the loss does not change."""
    hidden, weight, bias, target = make_inputs(torch.float32)
    kw = dict(bias=bias, backend=backend, label_smoothing=0.1, z_loss=1e-3)
    loss, _ = lossplug.linear_cross_entropy(hidden, weight, target, return_stats=True, **kw)
    torch.testing.assert_close(lossplug.linear_cross_entropy(hidden, weight, target, **kw), loss)


def test_bf16_torch_path_rounds_logits_like_the_models_head():
    """On bf16 the torch path is the model's own bf16 head followed by a float32 loss."""
    hidden, weight, _, target = make_inputs(torch.bfloat16, bias=False)
    loss = lossplug.linear_cross_entropy(hidden, weight, target, backend="torch")
    want = lossplug.cross_entropy(hidden @ weight.T, target, backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("all_ignored", ["zero", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch(backend, all_ignored):
    hidden, weight, bias, _ = make_inputs(torch.float32, shape=(2, 5))
    target = torch.full((2, 5), -100)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, stats = lossplug.linear_cross_entropy(
        *leaves[:2],
        target,
        bias=leaves[2],
        backend=backend,
        all_ignored=all_ignored,
        return_stats=True,
    )
    loss.backward()
    assert int(stats.tokens) == 0 and float(stats.nll_sum) == 0.0
    if all_ignored == "zero":
        assert float(loss.detach()) == 0.0
    else:
        assert torch.isnan(loss)
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_get_exact_zero_gradient(backend):
    hidden, weight, bias, target = make_inputs(torch.float32, shape=(4, 9), ignore_share=0.5)
    h = hidden.clone().requires_grad_()
    lossplug.linear_cross_entropy(h, weight, target, bias=bias, backend=backend).backward()
    ignored = target == -100
    assert ignored.any() and (~ignored).any()
    assert torch.equal(h.grad[ignored], torch.zeros_like(h.grad[ignored]))
    assert (h.grad[~ignored].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_with_retained_graph_recomputes(reduction):
    hidden, weight, _, target = make_inputs(torch.float32, bias=False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lossplug.linear_cross_entropy(h, w, target, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, 2 * first[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wants", ["hidden", "weight", "bias"])
def test_only_the_wanted_gradients(wants):
    hidden, weight, bias, target = make_inputs(torch.float32)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    leaves[wants].requires_grad_()
    loss = lossplug.linear_cross_entropy(
        leaves["hidden"], leaves["weight"], target, bias=leaves["bias"]
    )
    loss.backward()
    ref_leaves = {k: v.detach().double().requires_grad_(k == wants) for k, v in leaves.items()}
    ref, _ = reference_linear_cross_entropy(
        ref_leaves["hidden"], ref_leaves["weight"], target, bias=ref_leaves["bias"]
    )
    ref.backward()
    assert_grad_close(leaves[wants].grad, ref_leaves[wants].grad, 2e-5, wants)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_gives_the_same_loss_and_stats(backend):
    hidden, weight, bias, target = make_inputs(torch.float32)
    with torch.no_grad():
        loss, stats = lossplug.linear_cross_entropy(
            hidden, weight, target, bias=bias, backend=backend, return_stats=True
        )
    w = weight.clone().requires_grad_()
    loss_grad, stats_grad = lossplug.linear_cross_entropy(
        hidden, w, target, bias=bias, backend=backend, return_stats=True
    )
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, loss_grad.detach())
    torch.testing.assert_close(stats.nll_sum, stats_grad.nll_sum)


def test_non_contiguous_hidden():
    hidden, weight, bias, target = make_inputs(torch.float32, shape=(3, 20))
    wide = torch.randn(3, 20, DIM * 2)
    wide[..., ::2] = hidden
    view = wide[..., ::2].requires_grad_(False)
    h = view.clone().requires_grad_()
    want = lossplug.linear_cross_entropy(h, weight, target, bias=bias)
    got = lossplug.linear_cross_entropy(view, weight, target, bias=bias)
    torch.testing.assert_close(got, want.detach())


def test_autocast_casts_like_linear():
    hidden, weight, _, target = make_inputs(torch.float32, bias=False)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lossplug.linear_cross_entropy(hidden, w, target)
        want = lossplug.cross_entropy(F.linear(hidden, weight), target)
    loss.backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(hidden=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "hidden must be.*int32"),
        (dict(weight=torch.zeros(7, 4, dtype=torch.float64)), TypeError, "weight must have"),
        (dict(weight=torch.zeros(7, 4, dtype=torch.bfloat16)), TypeError, "weight must have"),
        (dict(weight=torch.zeros(7, 5)), ValueError, r"weight must be \[V, D\]"),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, r"target.shape \(3,\)"),
        (dict(target=torch.zeros(2, dtype=torch.float32)), TypeError, "target must be an integer"),
        (dict(bias=torch.zeros(6)), ValueError, r"bias must be \[V\]"),
        (dict(target=torch.tensor([0, 7])), ValueError, r"target\[1\] = 7 .*weight.shape\[0\]"),
        (dict(target=torch.tensor([0, -3])), ValueError, r"target\[1\] = -3 is negative"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, pattern):
    args = dict(
        hidden=torch.zeros(2, 4), weight=torch.zeros(7, 4), target=torch.zeros(2, dtype=torch.long)
    )
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        lossplug.linear_cross_entropy(args["hidden"], args["weight"], args["target"], **options)


def test_unchecked_bad_label_gives_nan_not_a_number():
    hidden, weight, _, _ = make_inputs(torch.float32, shape=(1, 3), bias=False)
    target = torch.tensor([[1, VOCAB + 5, 2]])
    loss = lossplug.linear_cross_entropy(hidden, weight, target, check_target=False)
    assert torch.isnan(loss)


def test_module_keeps_last_stats():
    criterion = lossplug.FusedLinearCrossEntropyLoss(shift=True, z_loss=1e-4)
    hidden, weight, bias, target = make_inputs(torch.float32)
    loss = criterion(hidden, weight, target, bias)
    want = lossplug.linear_cross_entropy(hidden, weight, target, bias=bias, shift=True, z_loss=1e-4)
    torch.testing.assert_close(loss, want)
    assert int(criterion.last_stats.tokens) == int((target[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="z_loss"):
        lossplug.FusedLinearCrossEntropyLoss(z_loss=-1.0)
    assert "shift=True" in repr(criterion)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    vocab=st.integers(2, 90),
    dim=st.integers(0, 20),
    ignore_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    shift=st.booleans(),
)
def test_property_random_shapes_match_reference(tokens, vocab, dim, ignore_share, seed, shift):
    hidden, weight, bias, target = make_inputs(
        torch.float32, shape=(tokens,), vocab=vocab, dim=dim, ignore_share=ignore_share, seed=seed
    )
    if shift and tokens < 2:
        shift = False
    loss, stats, grads, ref_loss, ref_stats, ref_grads = run_both(
        hidden, weight, bias, target, "torch", shift=shift
    )
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    assert int(stats.tokens) == int(ref_stats["tokens"])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# float64 inputs are computed in float64: float64 torch's numbers to rounding
FLOAT64_TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_float64_inputs_are_computed_in_float64(option):
    kw = OPTIONS[option]
    hidden, weight, bias, target = make_inputs(torch.float64)
    loss, stats, grads, ref_loss, ref_stats, ref_grads = run_both(
        hidden, weight, bias, target, "auto", **kw
    )
    assert loss.dtype == torch.float64 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss.detach(), **FLOAT64_TOL)
    assert int(stats.tokens) == int(ref_stats["tokens"])
    assert int(stats.correct) == int(ref_stats["correct"])
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(getattr(stats, name), ref_stats[name], **FLOAT64_TOL, msg=name)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, want, **FLOAT64_TOL, msg=name)


def test_float64_equals_torch_on_materialised_logits():
    hidden, weight, bias, target = make_inputs(torch.float64, shape=(2, 19))
    ours_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    theirs_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ours = lossplug.linear_cross_entropy(*ours_leaves[:2], target, bias=ours_leaves[2])
    theirs = F.cross_entropy(F.linear(*theirs_leaves).view(-1, VOCAB), target.view(-1))
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, **FLOAT64_TOL)
    ours.backward()
    theirs.backward()
    for got, want in zip(ours_leaves, theirs_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, **FLOAT64_TOL)


def test_float64_under_autocast_stays_float64_like_linear():
    """Autocast does not touch float64 matmuls, so neither does the fused head."""
    hidden, weight, _, target = make_inputs(torch.float64, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(hidden, weight).dtype == torch.float64
        loss = lossplug.linear_cross_entropy(hidden, weight, target)
    want, _ = reference_linear_cross_entropy(hidden, weight, target)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, **FLOAT64_TOL)


def test_triton_refuses_float64_hidden_by_name():
    hidden, weight, bias, target = make_inputs(torch.float64, shape=(2, 3))
    with pytest.raises(TypeError, match=r"backend='triton'.*float64 hidden.*backend='torch'"):
        lossplug.linear_cross_entropy(hidden, weight, target, bias=bias, backend="triton")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_hidden_dimension_gives_the_bias_as_logits(backend, with_bias, reduction):
    """``D = 0``: the logits are the bias (or zeros), as ``F.linear`` makes them."""
    hidden, weight, bias, target = make_inputs(
        torch.float32, shape=(2, 5), dim=0, bias=with_bias, seed=4
    )
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_leaves = [
        t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)
    ]
    loss = lossplug.linear_cross_entropy(
        leaves[0], leaves[1], target, bias=leaves[2], backend=backend, reduction=reduction
    )
    logits = F.linear(*ref_leaves)
    want = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), reduction=reduction)
    want = want.view(loss.shape)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    grad_out = torch.rand(loss.shape, dtype=torch.float64)
    loss.backward(grad_out.float())
    want.backward(grad_out)
    for leaf, ref in zip(leaves, ref_leaves, strict=True):
        if leaf is None:
            continue
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_on_sequences_of_one_and_none(backend):
    """With nothing left to score the per-token loss is empty and every gradient is zero."""
    for positions in (1, 0):
        hidden, weight, bias, target = make_inputs(torch.float32, shape=(3, positions), seed=5)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, stats = lossplug.linear_cross_entropy(
            *leaves[:2],
            target,
            bias=leaves[2],
            shift=True,
            reduction="none",
            backend=backend,
            return_stats=True,
        )
        assert loss.shape == target[:, :-1].shape == (3, 0)
        assert int(stats.tokens) == 0
        loss.sum().backward()
        for leaf in leaves:
            assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_vocabulary_gets_exact_zero_gradients(dtype):
    """A ``-inf`` bias masks a class: probability 0, so exactly 0 gradient in its weight row
    (float64 keeps probabilities far below float32's underflow, and must still give 0 here)."""
    hidden, weight, bias, target = make_inputs(dtype, ignore_share=0.0)
    target = target.clamp(max=VOCAB - 11)
    bias[-10:] = float("-inf")
    w = weight.clone().requires_grad_()
    loss, stats = lossplug.linear_cross_entropy(hidden, w, target, bias=bias, return_stats=True)
    loss.backward()
    assert torch.isfinite(w.grad).all() and torch.all(w.grad[-10:] == 0)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    ref, ref_stats = reference_cross_entropy(logits[..., :-10], target)
    tol = FLOAT64_TOL if dtype == torch.float64 else LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(
        stats.entropy_sum,
        ref_stats["entropy_sum"],
        rtol=tol["rtol"],
        atol=1e-4 if dtype == torch.float32 else 1e-12,
    )
