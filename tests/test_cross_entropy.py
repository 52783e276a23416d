"""The fused cross-entropy against a float64 reference: loss, stats and gradient, both backends."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import lossplug
from _reference import reference_cross_entropy

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of the loss against float64 on the same input values: the op computes in
# float32 whatever the input dtype, so half inputs are held to the float32 bound too
LOSS_RTOL = 1e-5
FLOAT32_AND_BFLOAT16 = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-7),
    torch.float16: dict(rtol=2e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-6),
}


def make_logits(shape, dtype, *, kind="normal", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "peaked":  # one dominant class per row: probabilities near 0 and 1
        x = x * 2
        x.scatter_(-1, torch.randint(0, shape[-1], (*shape[:-1], 1), generator=gen), 40.0)
    elif kind == "flat":
        x = torch.zeros(shape, dtype=torch.float64)
    else:
        x = x * 3
    return x.to(dtype)


def make_target(shape, vocab, *, ignore_share=0.2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < ignore_share] = -100
    return t


def make_inputs(shape, dtype, *, seed):
    """Logits of ``shape`` (seed ``seed``) and a target over their last dimension (``seed + 1``)."""
    return make_logits(shape, dtype, seed=seed), make_target(shape[:-1], shape[-1], seed=seed + 1)


def assert_stats_match(stats: lossplug.TokenStats, ref: dict, *, correct_atol: int = 0):
    assert stats.tokens.dtype == torch.int64 and stats.correct.dtype == torch.int64
    assert stats.nll_sum.dtype == torch.float64
    assert int(stats.tokens) == int(ref["tokens"])
    assert abs(int(stats.correct) - int(ref["correct"])) <= correct_atol
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        got, want = getattr(stats, name), ref[name]
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=1e-6, msg=name)


def run_both(logits, target, backend, grad_out=None, **kw):
    """Loss, stats and logits-gradient from lossplug and from the reference."""
    x = logits.clone().requires_grad_()
    loss, stats = lossplug.cross_entropy(x, target, backend=backend, return_stats=True, **kw)
    x_ref = logits.clone().requires_grad_()
    ref_loss, ref_stats = reference_cross_entropy(x_ref, target, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref_loss)
    loss.backward(grad_out.to(loss.dtype))
    ref_loss.backward(grad_out.double())
    return (loss, stats, x.grad), (ref_loss, ref_stats, x_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat"])
def test_matches_float64_reference(backend, dtype, kind):
    shape = (3, 37, 1013) if backend == "torch" else (3, 7, 1013)
    logits = make_logits(shape, dtype, kind=kind)
    target = make_target(shape[:-1], shape[-1])
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = run_both(logits, target, backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=LOSS_RTOL, atol=1e-7)
    assert_stats_match(stats, ref_stats)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), **GRAD_TOL[dtype])


OPTION_GRID = [
    dict(zip(("reduction", "label_smoothing", "z_loss", "softcap", "shift"), combo, strict=True))
    for combo in itertools.product(
        ["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-3], [None, 3.0], [False, True]
    )
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_keyword_combination(backend, options):
    shape = (2, 9, 211) if backend == "torch" else (2, 5, 211)
    logits = make_logits(shape, torch.float32, seed=7)
    target = make_target(shape[:-1], shape[-1], seed=8)
    ref_shape = (2, shape[1] - 1) if options["shift"] else shape[:-1]
    grad_out = None
    if options["reduction"] == "none":
        grad_out = torch.rand(ref_shape, generator=torch.Generator().manual_seed(3))
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = run_both(
        logits, target, backend, grad_out=grad_out, **options
    )
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=LOSS_RTOL, atol=1e-6)
    assert_stats_match(stats, ref_stats, correct_atol=0 if options["softcap"] is None else 1)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-7)


def test_reference_agrees_with_torch():
    """The reference itself has torch's semantics (ignore_index, smoothing, reductions)."""
    logits = make_logits((40, 97), torch.float64, seed=3)
    target = make_target((40,), 97)
    for reduction, eps in itertools.product(["mean", "sum", "none"], [0.0, 0.2]):
        ref, _ = reference_cross_entropy(logits, target, reduction=reduction, label_smoothing=eps)
        want = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(ref, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_same_as_torch_cross_entropy(backend, reduction, eps):
    logits = make_logits((4, 6, 129), torch.float32, seed=11)
    target = make_target((4, 6), 129, seed=12)
    ours = lossplug.cross_entropy(
        logits, target, reduction=reduction, label_smoothing=eps, backend=backend
    )
    theirs = F.cross_entropy(
        logits.double().view(-1, 129), target.view(-1), reduction=reduction, label_smoothing=eps
    )
    torch.testing.assert_close(ours.double(), theirs.view(ours.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@FLOAT32_AND_BFLOAT16
def test_shift_equals_the_copying_pattern(backend, dtype):
    """``shift=True`` gives what causal LMs get from ``logits[:, :-1]`` and ``labels[:, 1:]``."""
    logits, labels = make_inputs((3, 11, 301), dtype, seed=5)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    shifted = lossplug.cross_entropy(x1, labels, shift=True, backend=backend)
    copied = lossplug.cross_entropy(
        x2[:, :-1].contiguous(), labels[:, 1:].contiguous(), backend=backend
    )
    shifted.backward()
    copied.backward()
    torch.testing.assert_close(shifted, copied, rtol=1e-6, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=0)
    assert torch.all(x1.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_on_a_flat_sequence_and_sequence_of_one(backend):
    logits = make_logits((9, 50), torch.float32)
    target = make_target((9,), 50, ignore_share=0.0)
    loss, ref = (
        lossplug.cross_entropy(logits, target, shift=True, backend=backend, reduction="none"),
        F.cross_entropy(logits[:-1].double(), target[1:], reduction="none"),
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    one = lossplug.cross_entropy(
        logits[:1], target[:1], shift=True, backend=backend, return_stats=True
    )
    assert float(one[0]) == 0.0 and int(one[1].tokens) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_are_read_in_place(backend):
    base = make_logits((3, 8, 140), torch.float32, seed=21)
    target = make_target((3, 7), 128, seed=22)
    # a sliced sequence and a padded vocabulary: two row strides, no unit-stride problem
    view = base[:, :-1, :128]
    assert not view.is_contiguous()
    loss, stats = lossplug.cross_entropy(view, target, backend=backend, return_stats=True)
    ref, ref_stats = reference_cross_entropy(view, target)
    torch.testing.assert_close(loss.double(), ref, rtol=LOSS_RTOL, atol=1e-7)
    assert_stats_match(stats, ref_stats)
    # a transposed tensor (vocabulary not unit-stride) is accepted too
    transposed = base[0, :7].t().contiguous().t()
    assert transposed.stride(-1) != 1
    loss_t = lossplug.cross_entropy(transposed, target[0], backend=backend)
    ref_t, _ = reference_cross_entropy(transposed, target[0])
    torch.testing.assert_close(loss_t.double(), ref_t, rtol=LOSS_RTOL, atol=1e-7)
    # gradient of a non-contiguous leaf view flows back to the right elements
    leaf = base.clone().requires_grad_()
    lossplug.cross_entropy(leaf[:, :-1, :128], target, backend=backend).backward()
    x_ref = base.clone().requires_grad_()
    reference_cross_entropy(x_ref[:, :-1, :128], target)[0].backward()
    torch.testing.assert_close(leaf.grad.double(), x_ref.grad.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@FLOAT32_AND_BFLOAT16
def test_inplace_backward_writes_the_gradient_into_the_logits(backend, dtype):
    logits, target = make_inputs((4, 5, 97), dtype, seed=31)
    x_new = logits.clone().requires_grad_()
    lossplug.cross_entropy(x_new, target, backend=backend).backward()

    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1  # a non-leaf activation, as the output of an lm_head would be
    loss = lossplug.cross_entropy(buffer, target, backend=backend, inplace_backward=True)
    loss.backward()
    # by default the torch path computes this gradient in the forward sweep (one exponential per
    # logit), in place in backward() (another): equal to rounding there, exactly on Triton
    tol = dict(rtol=0, atol=0) if backend == "triton" else GRAD_TOL[dtype]
    torch.testing.assert_close(leaf.grad, x_new.grad, **tol)
    # the logits' own memory now holds the gradient: no second logits-sized buffer was needed
    torch.testing.assert_close(buffer.detach(), leaf.grad, rtol=0, atol=0)
    # and by default the logits are left untouched
    untouched = logits.clone().requires_grad_()
    before = untouched.detach().clone()
    lossplug.cross_entropy(untouched * 1, target, backend=backend).backward()
    assert torch.equal(untouched.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch(backend, reduction):
    logits = make_logits((2, 3, 64), torch.float32).requires_grad_()
    target = torch.full((2, 3), -100)
    loss, stats = lossplug.cross_entropy(
        logits, target, backend=backend, reduction=reduction, return_stats=True
    )
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(logits.grad == 0)
    assert int(stats.tokens) == 0 and int(stats.correct) == 0 and float(stats.nll_sum) == 0
    assert torch.isnan(stats.perplexity)  # nothing seen: no number, not inf
    if reduction == "mean":
        nan_loss = lossplug.cross_entropy(logits, target, backend=backend, all_ignored="nan")
        assert torch.isnan(nan_loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.zeros(0, 7, 33, requires_grad=True)
    target = torch.zeros(0, 7, dtype=torch.long)
    loss, stats = lossplug.cross_entropy(logits, target, backend=backend, return_stats=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(stats.tokens) == 0
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_masked_vocabulary(backend):
    logits = make_logits((6, 80), torch.float32, seed=41)
    logits[:, 60:] = float("-inf")  # padded vocabulary entries masked out
    target = make_target((6,), 60, ignore_share=0.0)
    x = logits.clone().requires_grad_()
    loss, stats = lossplug.cross_entropy(x, target, backend=backend, return_stats=True)
    ref, ref_stats = reference_cross_entropy(logits[:, :60], target)
    torch.testing.assert_close(loss.double(), ref, rtol=LOSS_RTOL, atol=1e-7)
    assert_stats_match(stats, ref_stats)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 60:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_logits_score_a_single_token(backend):
    logits = make_logits((30,), torch.float32)
    target = torch.tensor(4)
    ours = lossplug.cross_entropy(logits, target, backend=backend, reduction="none")
    assert ours.shape == ()
    torch.testing.assert_close(ours.double(), F.cross_entropy(logits.double(), target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_gives_the_same_stats(backend):
    logits = make_logits((5, 7, 123), torch.bfloat16, seed=51)
    target = make_target((5, 7), 123, seed=52)
    with torch.no_grad():
        loss_eval, stats_eval = lossplug.cross_entropy(
            logits, target, backend=backend, return_stats=True
        )
    loss_train, stats_train = lossplug.cross_entropy(
        logits.clone().requires_grad_(), target, backend=backend, return_stats=True
    )
    assert loss_train.requires_grad and not loss_eval.requires_grad
    assert not stats_train.nll_sum.requires_grad
    # the torch path computes a scalar loss's gradient in its forward sweep, from one exponential
    # per logit where the eval pass uses a log-softmax: the float sums agree to rounding there
    exact = backend == "triton"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_eval, loss_train.detach(), **tol)
    for name, value in stats_eval.as_dict().items():
        if exact or not value.dtype.is_floating_point:
            assert torch.equal(value, getattr(stats_train, name)), name
        else:
            torch.testing.assert_close(value, getattr(stats_train, name), **tol, msg=name)


def test_backends_agree_exactly_on_counts_and_closely_on_sums():
    logits = make_logits((4, 9, 517), torch.bfloat16, kind="peaked", seed=61)
    target = make_target((4, 9), 517, seed=62)
    _, a = lossplug.cross_entropy(logits, target, backend="torch", return_stats=True)
    _, b = lossplug.cross_entropy(logits, target, backend="triton", return_stats=True)
    assert int(a.tokens) == int(b.tokens) and int(a.correct) == int(b.correct)
    torch.testing.assert_close(a.nll_sum, b.nll_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.entropy_sum, b.entropy_sum, rtol=1e-6, atol=1e-6)


def test_bf16_perplexity_is_exact_where_upcasting_late_is_not():
    """The perplexity of bf16 logits matches float64 on the same values to 1e-5."""
    logits = make_logits((4, 64, 2000), torch.bfloat16, seed=71)
    target = make_target((4, 64), 2000, ignore_share=0.0, seed=72)
    _, stats = lossplug.cross_entropy(logits, target, return_stats=True)
    _, ref = reference_cross_entropy(logits, target)
    ref_ppl = torch.exp(ref["nll_sum"] / ref["tokens"])
    assert abs(float(stats.perplexity / ref_ppl) - 1) < 1e-5


@pytest.mark.parametrize(
    "layout",
    ["outer-stride-past-2**31", "row-times-stride-past-2**31"],
)
def test_large_offsets_use_64_bit_arithmetic(layout):
    """Rows that start past 2**31 elements are read from the right place by both backends."""
    vocab = 96
    # untouched pages of torch.empty cost no memory: only the rows written below are real
    if layout == "outer-stride-past-2**31":
        shape, strides = (2, 4, vocab), (2**31 + 64, vocab, 1)
    else:  # each factor fits in 32 bits, their product does not
        shape, strides = (1, 3, vocab), (0, 2**30 + 64, 1)
    storage = torch.empty(2**31 + 256 * vocab, dtype=torch.bfloat16)
    view = storage.as_strided(shape, strides)
    rows = make_logits(shape, torch.bfloat16, seed=81)
    view.copy_(rows)
    target = make_target(shape[:-1], vocab, ignore_share=0.0, seed=82)
    ref, _ = reference_cross_entropy(rows, target, reduction="none")
    for backend in BACKENDS:
        x = view.detach().requires_grad_()
        got = lossplug.cross_entropy(x, target, backend=backend, reduction="none")
        torch.testing.assert_close(got.double(), ref, rtol=LOSS_RTOL, atol=1e-6)
        got.sum().backward()
        x_ref = rows.clone().requires_grad_()
        reference_cross_entropy(x_ref, target, reduction="none")[0].sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@FLOAT32_AND_BFLOAT16
def test_nll_only_pass_gives_the_same_nll_and_lse(backend, dtype):
    """The metrics' cheaper pass (no argmax, no entropy) changes none of the NLL numbers."""
    from lossplug.ops._spec import LossSpec
    from lossplug.ops.cross_entropy import _cross_entropy

    logits, target = make_inputs((3, 9, 517), dtype, seed=91)

    def run(full_stats: bool):
        spec = LossSpec.validated(reduction="sum", shift=True, full_stats=full_stats)
        return _cross_entropy(logits, target, spec, return_stats=True, backend=backend)

    full_loss, full = run(True)
    nll_loss, nll_only = run(False)
    torch.testing.assert_close(nll_loss, full_loss, rtol=1e-6, atol=0)
    assert int(nll_only.tokens) == int(full.tokens)
    torch.testing.assert_close(nll_only.nll_sum, full.nll_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(nll_only.lse_sq_sum, full.lse_sq_sum, rtol=1e-6, atol=0)
    if backend == "torch":  # the Triton pass computes everything anyway: it is free there
        assert int(nll_only.correct) == 0 and float(nll_only.entropy_sum) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_stats_is_the_same(backend):
    """Without return_stats the argmax and entropy are skipped; loss and gradient do not change."""
    logits, target = make_logits((2, 9, 101), torch.float32), make_target((2, 9), 101)
    kw = dict(backend=backend, label_smoothing=0.1, z_loss=1e-3, softcap=8.0, shift=True)
    x_stats, x_plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with_stats, _ = lossplug.cross_entropy(x_stats, target, return_stats=True, **kw)
    plain = lossplug.cross_entropy(x_plain, target, **kw)
    with_stats.backward()
    plain.backward()
    torch.testing.assert_close(plain, with_stats)
    torch.testing.assert_close(x_plain.grad, x_stats.grad)


# float64 logits are computed in float64: the loss must be float64 torch's to rounding
FLOAT64_TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_float64_logits_are_computed_in_float64(options):
    shape = (2, 9, 211)
    logits = make_logits(shape, torch.float64, seed=7)
    target = make_target(shape[:-1], shape[-1], seed=8)
    ref_shape = (2, shape[1] - 1) if options["shift"] else shape[:-1]
    grad_out = None
    if options["reduction"] == "none":
        grad_out = torch.rand(ref_shape, dtype=torch.float64)
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = run_both(
        logits, target, "auto", grad_out=grad_out, **options
    )
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss.detach(), **FLOAT64_TOL)
    assert stats.nll_sum.dtype == torch.float64 and stats.tokens.dtype == torch.int64
    assert int(stats.tokens) == int(ref_stats["tokens"])
    assert int(stats.correct) == int(ref_stats["correct"])
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(getattr(stats, name), ref_stats[name], **FLOAT64_TOL, msg=name)
    torch.testing.assert_close(grad, ref_grad, **FLOAT64_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_equals_torch_cross_entropy(reduction):
    """What ``F.cross_entropy`` gives for float64 logits, loss dtype and gradient included."""
    logits = make_logits((4, 6, 129), torch.float64, kind="peaked", seed=11)
    target = make_target((4, 6), 129, seed=12)
    ours_x, theirs_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = lossplug.cross_entropy(ours_x, target, reduction=reduction, label_smoothing=0.1)
    theirs = F.cross_entropy(
        theirs_x.view(-1, 129), target.view(-1), reduction=reduction, label_smoothing=0.1
    )
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs.view(ours.shape), **FLOAT64_TOL)
    grad_out = torch.rand(ours.shape, dtype=torch.float64)
    ours.backward(grad_out)
    theirs.backward(grad_out.view(theirs.shape))
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, **FLOAT64_TOL)


def test_float64_masked_vocabulary_keeps_exact_zeros():
    """``-inf`` logits: a finite entropy and a zero gradient in float64 too (whose exp of the
    float32 log-probability floor is not 0)."""
    logits = make_logits((6, 80), torch.float64, seed=41)
    logits[:, 60:] = float("-inf")
    target = make_target((6,), 60, ignore_share=0.0)
    x = logits.clone().requires_grad_()
    loss, stats = lossplug.cross_entropy(x, target, return_stats=True)
    ref, ref_stats = reference_cross_entropy(logits[:, :60], target)
    torch.testing.assert_close(loss, ref, **FLOAT64_TOL)
    for name in ("nll_sum", "entropy_sum", "lse_sq_sum"):
        torch.testing.assert_close(getattr(stats, name), ref_stats[name], **FLOAT64_TOL, msg=name)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, 60:] == 0)


def test_triton_refuses_float64_by_name_and_auto_takes_the_torch_path():
    logits = make_logits((2, 3, 17), torch.float64)
    target = make_target((2, 3), 17)
    with pytest.raises(TypeError, match=r"backend='triton'.*float64 logits.*backend='torch'"):
        lossplug.cross_entropy(logits, target, backend="triton")
    auto = lossplug.cross_entropy(logits, target, backend="auto")
    forced = lossplug.cross_entropy(logits, target, backend="torch")
    assert auto.dtype == torch.float64 and torch.equal(auto, forced)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", [1, 0])
def test_shift_with_no_position_left_to_score_is_torchs_empty_composition(backend, positions):
    """``[B, 1, V]`` (and ``[B, 0, V]``) with ``shift=True``: what the Hugging Face shift gives."""
    vocab = 13
    logits = make_logits((3, positions, vocab), torch.float32, seed=15)
    target = make_target((3, positions), vocab, ignore_share=0.0, seed=16)
    hf_logits = logits[:, :-1].reshape(-1, vocab).double()
    hf_target = target[:, 1:].reshape(-1)
    x = logits.clone().requires_grad_()
    per_token, stats = lossplug.cross_entropy(
        x, target, shift=True, reduction="none", backend=backend, return_stats=True
    )
    # documented shape: target[..., :-1]
    assert per_token.shape == target[:, :-1].shape == (3, 0)
    torch.testing.assert_close(
        per_token.double().reshape(-1), F.cross_entropy(hf_logits, hf_target, reduction="none")
    )
    assert int(stats.tokens) == 0 and int(stats.correct) == 0 and float(stats.nll_sum) == 0
    per_token.sum().backward()
    assert x.grad.shape == x.shape and torch.all(x.grad == 0)
    # "sum" is torch's 0; "mean" is torch's 0/0 = nan with all_ignored="nan", 0 by default
    for reduction, all_ignored, want in [
        ("sum", "zero", F.cross_entropy(hf_logits, hf_target, reduction="sum")),
        ("mean", "nan", F.cross_entropy(hf_logits, hf_target, reduction="mean")),
        ("mean", "zero", torch.tensor(0.0, dtype=torch.float64)),
    ]:
        x = logits.clone().requires_grad_()
        loss, stats = lossplug.cross_entropy(
            x,
            target,
            shift=True,
            reduction=reduction,
            all_ignored=all_ignored,
            backend=backend,
            return_stats=True,
        )
        torch.testing.assert_close(loss.double(), want, equal_nan=True)
        assert int(stats.tokens) == 0
        loss.backward()
        assert x.grad.shape == x.shape and torch.all(x.grad == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_scalar_loss_gradient_from_the_forward_sweep(reduction, dtype, scale):
    """The torch path computes a scalar loss's gradient while it scores the logits; backward()
    only scales it by the incoming gradient when that is not 1."""
    logits = make_logits((3, 7, 257), dtype, seed=101)
    target = make_target((3, 7), 257, seed=102)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=9.0, shift=True)
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = run_both(
        logits, target, "torch", grad_out=torch.tensor(scale), **kw
    )
    tol = FLOAT64_TOL if dtype == torch.float64 else GRAD_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=LOSS_RTOL, atol=1e-6)
    assert_stats_match(stats, ref_stats, correct_atol=1)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad.double().to(dtype).double(), **tol)


def test_scalar_loss_gradient_survives_a_retained_graph_and_autograd_grad():
    """A second backward through a retained graph recomputes the gradient it gave away."""
    logits = make_logits((2, 9, 101), torch.float32, seed=103)
    target = make_target((2, 9), 101, seed=104)
    x = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = lossplug.cross_entropy(x, target, backend="torch")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (loss * 3).backward()
    reference_cross_entropy(ref, target)[0].backward()
    torch.testing.assert_close(first, ref.grad.float(), **GRAD_TOL[torch.float32])
    torch.testing.assert_close(x.grad, 4 * ref.grad.float(), **GRAD_TOL[torch.float32])
    # through autograd.grad of a non-leaf, as an lm_head's output would be
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(lossplug.cross_entropy(leaf * 1, target), leaf)
    torch.testing.assert_close(grad, ref.grad.float(), **GRAD_TOL[torch.float32])


def test_scalar_loss_gradient_is_not_left_in_the_graph():
    """The gradient computed in the forward sweep is handed over, not kept: the graph holds no
    logits-sized buffer after backward(), and the leaf's .grad is that very buffer."""
    logits = make_logits((2, 9, 101), torch.float32, seed=105)
    target = make_target((2, 9), 101, seed=106)
    x = logits.clone().requires_grad_()
    loss = lossplug.cross_entropy(x, target, backend="torch")
    node = loss.grad_fn
    while node is not None and "GradInForward" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None, "the scalar loss did not take the forward-gradient path"
    assert node.grad_logits is not None and node.grad_logits.shape == (1, 18, 101)
    held = node.grad_logits.data_ptr()  # not a reference: one would make autograd copy the buffer
    loss.backward()
    assert node.grad_logits is None
    assert x.grad.data_ptr() == held  # the leaf took the buffer, no copy


def test_scalar_loss_gradient_keeps_autograd_s_guards():
    """The forward-sweep gradient still refuses logits changed in place before backward() and a
    second backward() through a freed graph, as F.cross_entropy does."""
    target = make_target((2, 5), 11, seed=108)
    leaf = make_logits((2, 5, 11), torch.float32, seed=107).requires_grad_()
    logits = leaf * 1
    loss = lossplug.cross_entropy(logits, target, backend="torch")
    logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = lossplug.cross_entropy(leaf, target, backend="torch")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


#: two confident rows at large logits: lse rounded to float32 (an ulp of 7.6e-6 at 77) is 3% of
#: the first row's loss (1e-4) and of its target's gradient p - 1
CONFIDENT_LOGITS = torch.tensor(
    [[-34.19, -20.89, 68.19, -0.40, 77.375, -74.06, 49.41, -18.77, 52.81],
     [-18.66, -45.06, 55.66, -140.75, 19.19, -56.03, -27.25, 10.90, -20.23]]
)  # fmt: skip
CONFIDENT_TARGET = torch.tensor([4, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_a_confident_rows_loss_is_as_exact_as_torchs_on_large_logits(op, backend):
    z, y = CONFIDENT_LOGITS, CONFIDENT_TARGET
    exact = F.cross_entropy(z.double(), y, reduction="none")
    anchor_err = (F.cross_entropy(z, y, reduction="none").double() - exact).abs().max().item()
    if op == "cross_entropy":
        ours = lossplug.cross_entropy(z, y, reduction="none", backend=backend)
    else:  # hidden states times an identity output layer give the same logits
        eye = torch.eye(z.shape[1])
        ours = lossplug.linear_cross_entropy(z, eye, y, reduction="none", backend=backend)
    assert (ours.double() - exact).abs().max().item() <= 2 * anchor_err + 1e-9


@pytest.mark.parametrize("options", [dict(reduction="none"), dict(inplace_backward=True)])
def test_recomputed_gradient_is_as_exact_as_torchs_on_large_confident_logits(options):
    # computing p as e^(z - lse) carried lse's rounding into p - 1: 3e-6 against torch's 3e-8
    z, y = CONFIDENT_LOGITS, CONFIDENT_TARGET
    exact = z.double().requires_grad_()
    F.cross_entropy(exact, y, reduction="sum").backward()
    anchor = z.clone().requires_grad_()
    F.cross_entropy(anchor, y, reduction="sum").backward()
    ours = z.clone().requires_grad_()
    loss = lossplug.cross_entropy(ours * 1.0, y, backend="torch", **options)
    (loss.sum() if loss.dim() else loss * y.numel()).backward()
    anchor_err = (anchor.grad.double() - exact.grad).abs().max().item()
    ours_err = (ours.grad.double() - exact.grad).abs().max().item()
    assert ours_err <= 2 * anchor_err + 1e-9, (ours_err, anchor_err)
