"""LossSpec: the fused losses' options validated once; the backend table of ops/_dispatch.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest
import torch

import lossplug
from lossplug.metrics import LanguageModelMetrics, Perplexity
from lossplug.ops import _dispatch
from lossplug.ops._dispatch import (
    BACKEND_MODULES,
    CrossEntropyBackend,
    GradInForwardBackend,
    LinearCrossEntropyBackend,
)
from lossplug.ops._spec import LossSpec

BAD_OPTIONS = [
    (dict(ignore_index=1.5), TypeError, r"^ignore_index must be an int, got 1.5$"),
    (dict(ignore_index=True), TypeError, r"^ignore_index must be an int, got True$"),
    (dict(reduction="avg"), ValueError, r"^reduction must be one of .*, got 'avg'$"),
    (dict(all_ignored="inf"), ValueError, r"^all_ignored must be one of .*, got 'inf'$"),
    (dict(label_smoothing=1.5), ValueError, r"^label_smoothing must be .*\[0, 1\], got 1.5$"),
    (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing.*nan"),
    (dict(z_loss=-1e-4), ValueError, r"^z_loss must be a finite number >= 0, got -0.0001$"),
    (dict(z_loss=float("inf")), ValueError, r"z_loss.*inf"),
    (dict(softcap=0.0), ValueError, r"^softcap must be None or a finite number > 0, got 0.0$"),
    (dict(softcap=-30), ValueError, r"softcap.*-30"),
    (dict(softcap=float("nan")), ValueError, r"softcap.*nan"),
    (dict(softcap="30"), TypeError, r"softcap.*'30'"),
    (dict(softcap=True), TypeError, r"softcap.*True"),
    (dict(shift=1), TypeError, r"^shift must be a bool, got 1$"),
]


@pytest.mark.parametrize(("options", "error", "pattern"), BAD_OPTIONS)
def test_bad_options_name_the_argument_and_value_wherever_they_are_given(options, error, pattern):
    """One check, so one error for one bad value: from the spec, the ops and the modules."""
    logits, target = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(error, match=pattern):
        LossSpec.validated(**options)
    with pytest.raises(error, match=pattern):
        lossplug.cross_entropy(logits, target, **options)
    with pytest.raises(error, match=pattern):
        lossplug.linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), target, **options)
    with pytest.raises(error, match=pattern):
        lossplug.FusedCrossEntropyLoss(**options)
    with pytest.raises(error, match=pattern):
        lossplug.FusedLinearCrossEntropyLoss(**options)


def test_the_spec_is_frozen_hashable_and_holds_plain_numbers():
    import numpy as np

    spec = LossSpec.validated(ignore_index=np.int32(0), softcap=np.float32(30), z_loss=1)
    assert (type(spec.ignore_index), type(spec.softcap), type(spec.z_loss)) == (int, float, float)
    assert spec == LossSpec.validated(ignore_index=0, softcap=30.0, z_loss=1e0)
    assert hash(spec) == hash(LossSpec.validated(ignore_index=0, softcap=30.0, z_loss=1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.shift = True  # type: ignore[misc]
    assert spec.replace(shift=True).shift and not spec.shift
    with pytest.raises(ValueError, match=r"reduction.*'avg'"):
        spec.replace(reduction="avg")


def test_defaults_are_those_of_the_op():
    defaults = {
        name: p.default
        for name, p in inspect.signature(lossplug.cross_entropy).parameters.items()
        if name in {f.name for f in dataclasses.fields(LossSpec)}
    }
    assert len(defaults) == 7
    spec = LossSpec.validated()
    assert {name: getattr(spec, name) for name in defaults} == defaults
    assert spec.full_stats


def test_the_modules_validate_once_and_keep_the_options_as_attributes():
    criterion = lossplug.FusedCrossEntropyLoss(ignore_index=0, shift=True, softcap=30)
    assert criterion.spec == LossSpec.validated(ignore_index=0, shift=True, softcap=30.0)
    assert (criterion.ignore_index, criterion.shift, criterion.softcap) == (0, True, 30.0)
    criterion.reduction = "sum"  # as on torch.nn.CrossEntropyLoss
    assert criterion.spec.reduction == "sum"
    with pytest.raises(ValueError, match=r"reduction must be one of.*'avg'"):
        criterion.reduction = "avg"
    assert criterion.reduction == "sum"
    logits, target = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    want = lossplug.cross_entropy(
        logits, target, ignore_index=0, shift=True, softcap=30.0, reduction="sum"
    )
    assert torch.equal(criterion(logits, target), want)


def test_the_metrics_and_the_monitor_keep_one_spec():
    metric = LanguageModelMetrics(ignore_index=0, shift=True, softcap=30)
    assert metric.spec == LossSpec.validated(
        ignore_index=0, shift=True, softcap=30.0, reduction="sum"
    )
    assert (metric.ignore_index, metric.shift, metric.softcap) == (0, True, 30.0)
    assert not Perplexity().spec.full_stats  # the NLL-only pass
    monitor = lossplug.LossMonitor(ignore_index=0, shift=True, softcap=30)
    assert monitor.spec == metric.spec
    assert monitor.op_kwargs == {"ignore_index": 0, "shift": True, "softcap": 30.0}


def test_a_shift_without_a_sequence_axis_is_refused_where_the_target_is():
    LossSpec.validated(shift=True)  # no tensor yet: nothing to refuse
    with pytest.raises(ValueError, match=r"shift=True needs a sequence axis.*\(\)"):
        lossplug.cross_entropy(torch.randn(5), torch.tensor(1), shift=True)


@pytest.mark.parametrize(
    ("op", "protocol"),
    [("cross_entropy", CrossEntropyBackend), ("linear_cross_entropy", LinearCrossEntropyBackend)],
)
def test_the_backend_table_names_modules_that_provide_the_protocol(op, protocol):
    backends = BACKEND_MODULES[op]
    modules = [backends.torch_module]
    if importlib.util.find_spec("triton") is not None:
        modules.append(backends.import_triton())
    for module in modules:
        assert module.__name__.rsplit(".", 1)[-1] == op
        assert isinstance(module, protocol), module.__name__
        for name in ("forward", "backward"):
            want = inspect.signature(getattr(protocol, name))
            want = want.replace(parameters=list(want.parameters.values())[1:])  # no self
            got = inspect.signature(getattr(module, name))
            assert list(got.parameters) == list(want.parameters), (module.__name__, name)
            kinds = [p.kind for p in got.parameters.values()]
            assert kinds == [p.kind for p in want.parameters.values()], (module.__name__, name)
        if op == "cross_entropy":  # the flag says whether the forward-gradient sweep exists
            assert isinstance(module, GradInForwardBackend) == module.PRECOMPUTES_GRAD
    assert BACKEND_MODULES["cross_entropy"].torch_module.PRECOMPUTES_GRAD


def test_resolve_gives_the_table_s_modules_and_keeps_its_errors():
    logits = torch.randn(2, 5)
    assert _dispatch.resolve("torch", "cross_entropy", logits) is (
        BACKEND_MODULES["cross_entropy"].torch_module
    )
    assert _dispatch.resolve("auto", "linear_cross_entropy", logits, "hidden") is (
        BACKEND_MODULES["linear_cross_entropy"].torch_module
    )
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got 'gpu'$"):
        _dispatch.resolve("gpu", "cross_entropy", logits)
