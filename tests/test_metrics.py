"""lossplug.metrics against a float64 reference, torchmetrics, DDP, resume and MetricCollection."""

from __future__ import annotations

import math
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torchmetrics

import lossplug
from _ddp_worker import make_batches
from _ddp_worker import run as ddp_run
from _reference import reference_values
from lossplug.metrics import (
    BY_NAME,
    CrossEntropy,
    LanguageModelMetrics,
    Perplexity,
    TokenAccuracy,
)
from lossplug.monitoring import METRIC_NAMES


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
@pytest.mark.parametrize(
    "options", [{}, {"shift": True}, {"softcap": 5.0, "ignore_index": 0}], ids=str
)
def test_every_metric_matches_float64(dtype, options):
    # float64 logits are computed in float64: held to its rounding, not float32's
    rel_tol = 1e-12 if dtype == torch.float64 else 1e-5
    batches = [(x.to(dtype), t) for x, t in make_batches(seed=3)]
    if options.get("ignore_index") == 0:
        batches = [(x, t.clamp(min=0)) for x, t in batches]
    want = reference_values(batches, **options)
    metrics = {name: forms.metric(**options) for name, forms in BY_NAME.items()}
    combined = LanguageModelMetrics(**options)
    for logits, target in batches:
        for metric in (*metrics.values(), combined):
            metric.update(logits, target)
    together = combined.compute()
    assert int(together["tokens"]) == want["tokens"]
    for name, metric in metrics.items():
        value = metric.compute()
        assert value.dtype == torch.float64
        assert math.isclose(float(value), want[name], rel_tol=rel_tol), name
        assert float(together[name]) == float(value), name
        one_batch = BY_NAME[name].functional(*batches[0], **options)
        assert math.isclose(
            float(one_batch), reference_values(batches[:1], **options)[name], rel_tol=rel_tol
        )


def test_bf16_perplexity_is_exact_where_torchmetrics_is_not():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 128, 5000, generator=gen) * 4).to(torch.bfloat16)
    target = torch.randint(0, 5000, (4, 128), generator=gen)
    exact = reference_values([(logits, target)])["perplexity"]
    ours = Perplexity()
    ours.update(logits, target)
    assert abs(float(ours.compute()) / exact - 1) < 1e-5
    theirs = torchmetrics.text.Perplexity()
    theirs.update(logits, target)
    # recorded for the benchmark table, not asserted: theirs computes the softmax in bf16
    print(f"torchmetrics relative error on bf16: {abs(float(theirs.compute()) / exact - 1):.2e}")


def test_every_logged_name_has_a_metric_and_a_value():
    assert tuple(BY_NAME) == METRIC_NAMES
    values = LanguageModelMetrics()
    values.update(*make_batches(seed=3)[0])
    assert set(values.compute()) == {*BY_NAME, "tokens"}


def perplexity_here_and_in_torchmetrics(batches):
    """Our ``Perplexity`` and torchmetrics', each updated with every batch."""
    ours, theirs = Perplexity(), torchmetrics.text.Perplexity(ignore_index=-100)
    for logits, target in batches:
        ours.update(logits, target)
        theirs.update(logits, target)
    return ours, theirs


def test_agrees_with_torchmetrics_perplexity_on_float32():
    batches = [(x.float(), t) for x, t in make_batches(seed=5)]
    ours, theirs = perplexity_here_and_in_torchmetrics(batches)
    assert math.isclose(float(ours.compute()), float(theirs.compute()), rel_tol=1e-5)


def test_agrees_with_torchmetrics_perplexity_on_float64():
    """torchmetrics takes float64 logits; so must its drop-in (and keep its states' dtypes)."""
    batches = [(x.double(), t) for x, t in make_batches(seed=6)]
    ours, theirs = perplexity_here_and_in_torchmetrics(batches)
    assert math.isclose(float(ours.compute()), float(theirs.compute()), rel_tol=1e-6)
    assert math.isclose(
        float(ours.compute()), reference_values(batches)["perplexity"], rel_tol=1e-12
    )
    assert ours.stats.nll_sum.dtype == torch.float64 and ours.stats.tokens.dtype == torch.int64


def test_triton_metric_refuses_float64_logits_by_name():
    metric = Perplexity(backend="triton")
    logits, target = make_batches(seed=6)[0]
    with pytest.raises(TypeError, match=r"backend='triton'.*float64 logits"):
        metric.update(logits.double(), target)


def test_an_underflowing_token_does_not_make_the_perplexity_infinite():
    logits = torch.zeros(2, 50)
    logits[0, 1] = 200.0  # the true token 0 has probability e^-200: 0 in float32 softmax
    target = torch.tensor([0, 3])
    metric = Perplexity()
    metric.update(logits, target)
    want = reference_values([(logits, target)])["perplexity"]
    assert math.isfinite(float(metric.compute()))
    assert math.isclose(float(metric.compute()), want, rel_tol=1e-5)


def test_three_update_forms_agree():
    batches = make_batches(seed=7)
    by_logits, by_stats, by_losses = Perplexity(shift=True), Perplexity(shift=True), Perplexity()
    ce_by_losses = CrossEntropy()
    for logits, target in batches:
        by_logits.update(logits, target)
        # the training loss already computed the stats: zero extra work
        x = logits.clone().requires_grad_()
        loss, stats = lossplug.cross_entropy(x, target, shift=True, return_stats=True)
        loss.backward()
        by_stats.update(stats)
        per_token = lossplug.cross_entropy(logits, target, shift=True, reduction="none")
        mask = target[:, 1:] != -100
        by_losses.update(per_token, mask)
        ce_by_losses.update(per_token, mask=mask)
    values = [float(m.compute()) for m in (by_logits, by_stats, by_losses)]
    # the training pass computes its gradient from one exponential per logit, the eval pass from
    # a log-softmax: the same sums to rounding
    assert math.isclose(values[0], values[1], rel_tol=1e-7)
    assert math.isclose(values[0], values[2], rel_tol=1e-6)
    assert math.isclose(float(ce_by_losses.compute()), math.log(values[0]), rel_tol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_run, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    single = LanguageModelMetrics(shift=True)
    single_ppl = Perplexity(shift=True)
    for logits, target in make_batches():
        single.update(logits, target)
        single_ppl.update(logits, target)
    want = single.compute()
    got = result["values"]
    assert int(got["tokens"]) == int(want["tokens"])
    assert int(result["local_tokens"]) < int(want["tokens"])  # each rank saw only its share
    for name in ("cross_entropy", "perplexity", "token_accuracy", "entropy"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0, msg=name)
    torch.testing.assert_close(got["perplexity"], single_ppl.compute(), rtol=1e-12, atol=0)


def test_resume_from_state_dict_continues_the_aggregate():
    batches = make_batches(seed=11)
    uninterrupted = LanguageModelMetrics(shift=True)
    for batch in batches:
        uninterrupted.update(*batch)
    first = LanguageModelMetrics(shift=True)
    for batch in batches[:2]:
        first.update(*batch)
    saved = first.state_dict()
    assert any(key.startswith("nll_sum_") for key in saved)
    resumed = LanguageModelMetrics(shift=True)
    resumed.load_state_dict(saved)
    for batch in batches[2:]:
        resumed.update(*batch)
    want, got = uninterrupted.compute(), resumed.compute()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_collection_keeps_different_configurations_apart_and_shares_equal_ones():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 40, generator=gen)
    clean = torch.randint(1, 40, (3, 10), generator=gen)  # no -100 and no 0: equal first states
    padded = clean.clone()
    padded[:, 7:] = 0
    collection = torchmetrics.MetricCollection(
        {
            "ppl_ignore_pad": Perplexity(ignore_index=0),
            "ppl_default": Perplexity(),
            "ce_default": CrossEntropy(),
            "acc_default": TokenAccuracy(),
        },
        compute_groups=True,
    )
    collection.update(logits, clean)
    collection.update(logits, padded)
    values = collection.compute()
    both = [(logits, clean), (logits, padded)]
    assert math.isclose(
        float(values["ppl_ignore_pad"]),
        reference_values(both, ignore_index=0)["perplexity"],
        rel_tol=1e-6,
    )
    assert math.isclose(
        float(values["ppl_default"]), reference_values(both)["perplexity"], rel_tol=1e-6
    )
    assert float(values["ppl_ignore_pad"]) != float(values["ppl_default"])
    assert math.isclose(
        float(values["ce_default"]), math.log(float(values["ppl_default"])), rel_tol=1e-12
    )
    groups = [sorted(group) for group in collection.compute_groups.values()]
    # NLL-only metrics never share with metrics that read the accuracy and entropy sums
    assert sorted(groups) == [["acc_default"], ["ce_default", "ppl_default"], ["ppl_ignore_pad"]]
    assert math.isclose(
        float(values["acc_default"]), reference_values(both)["token_accuracy"], rel_tol=1e-12
    )


def test_no_token_seen_gives_nan_and_one_warning():
    metric = Perplexity()
    metric.update(torch.randn(2, 3, 7), torch.full((2, 3), -100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = metric.compute(), Perplexity.compute(metric)
    assert math.isnan(float(first)) and math.isnan(float(second))
    ours = [w for w in caught if "no token has been scored" in str(w.message)]
    assert len(ours) == 1


def test_torchmetrics_conventions():
    assert Perplexity.full_state_update is False and Perplexity.higher_is_better is False
    assert TokenAccuracy.higher_is_better is True and not Perplexity.is_differentiable
    metric = Perplexity(compute_on_cpu=True, sync_on_compute=False)
    assert metric.compute_on_cpu and not metric.sync_on_compute
    batches = make_batches(seed=13)
    a, b, whole = Perplexity(), Perplexity(), Perplexity()
    for index, batch in enumerate(batches):
        (a if index % 2 else b).update(*batch)
        whole.update(*batch)
    a.merge_state(b)
    assert float(a.compute()) == float(whole.compute())
    moved = Perplexity().to(torch.float64)
    assert moved.stats.tokens.dtype == torch.int64  # counts stay integers
    metric.update(*batches[0])
    metric.reset()
    assert int(metric.stats.tokens) == 0


def test_plot_has_bounds():
    pytest.importorskip("matplotlib")
    metric = TokenAccuracy()
    values = []
    for batch in make_batches(seed=17):
        metric.update(*batch)
        values.append(metric.compute())
    fig, ax = metric.plot(values)
    assert ax.get_ylim()[0] <= 0.0 and ax.get_ylim()[1] >= 1.0
    fig.clf()


@pytest.mark.parametrize(
    ("make", "args", "kwargs", "error", "pattern"),
    [
        (
            Perplexity,
            (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)),
            {},
            ValueError,
            r"target.shape \(2, 4\)",
        ),
        (
            Perplexity,
            (torch.randn(2, 5, 7), torch.full((2, 5), 7)),
            {},
            ValueError,
            r"= 7 is out of range",
        ),
        (Perplexity, (torch.randn(4),), {}, ValueError, r"update needs a target"),
        (
            Perplexity,
            ([1.0, 2.0], torch.zeros(2, dtype=torch.long)),
            {},
            TypeError,
            r"got preds of type list",
        ),
        (
            Perplexity,
            (torch.randn(4), torch.ones(4)),
            {"mask": torch.ones(4, dtype=torch.bool)},
            ValueError,
            r"not both",
        ),
        (Perplexity, (torch.randn(4),), {"mask": torch.ones(4)}, TypeError, r"mask must be a bool"),
        (
            Perplexity,
            (torch.randn(4),),
            {"mask": torch.ones(3, dtype=torch.bool)},
            ValueError,
            r"mask.shape \(3,\) must equal losses.shape \(4,\)",
        ),
        (
            TokenAccuracy,
            (torch.randn(4),),
            {"mask": torch.ones(4, dtype=torch.bool)},
            ValueError,
            r"carry no predictions",
        ),
        (
            Perplexity,
            (lossplug.TokenStats.zeros(), torch.zeros(1)),
            {},
            ValueError,
            r"TokenStats alone",
        ),
    ],
)
def test_bad_updates_raise_clear_errors(make, args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        make().update(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"ignore_index": "pad"}, TypeError, r"ignore_index must be an int, got 'pad'"),
        ({"shift": 1}, TypeError, r"shift must be a bool, got 1"),
        ({"softcap": -1.0}, ValueError, r"softcap.*-1.0"),
        ({"backend": "gpu"}, ValueError, r"backend must be one of.*'gpu'"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        LanguageModelMetrics(**kwargs)
