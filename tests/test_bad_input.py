"""Bad input raises at once, with a message that names the argument and the offending value."""

from __future__ import annotations

import pytest
import torch

import lossplug

LOGITS = torch.randn(2, 5, 17)
TARGET = torch.randint(0, 17, (2, 5))


def call(logits=LOGITS, target=TARGET, **kw):
    return lossplug.cross_entropy(logits, target, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            dict(target=torch.full((2, 5), 17)),
            ValueError,
            r"target\[0, 0\] = 17 is out of range.*17",
        ),
        (dict(target=torch.full((2, 5), -1)), ValueError, r"target\[0, 0\] = -1 is negative.*-100"),
        (
            dict(target=torch.zeros(2, 4, dtype=torch.long)),
            ValueError,
            r"target.shape \(2, 4\).*\(2, 5\)",
        ),
        (dict(target=torch.zeros(2, 5)), TypeError, r"target must be an integer.*float32"),
        (dict(target=torch.zeros(2, 5, dtype=torch.bool)), TypeError, r"target.*torch.bool"),
        (dict(logits=torch.randn(2, 5, 0)), ValueError, r"logits.shape\[-1\].*must not be 0"),
        (dict(logits=LOGITS.to(torch.complex64)), TypeError, r"logits must be.*torch.complex64"),
        (dict(logits=LOGITS.double(), backend="triton"), TypeError, r"float64 logits"),
        (dict(logits=LOGITS.long()), TypeError, r"logits must be.*torch.int64"),
        (dict(logits=torch.tensor(1.0)), ValueError, r"at least one dimension"),
        (dict(logits=LOGITS.numpy()), TypeError, r"logits must be a torch.Tensor, got ndarray"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of.*'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing.*1.5"),
        (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing.*nan"),
        (dict(z_loss=-1e-4), ValueError, r"z_loss.*-0.0001"),
        (dict(softcap=0.0), ValueError, r"softcap.*0.0"),
        (dict(softcap=-30), ValueError, r"softcap.*-30"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
        (dict(backend="cuda"), ValueError, r"backend must be one of.*'cuda'"),
        (dict(all_ignored="inf"), ValueError, r"all_ignored must be one of.*'inf'"),
    ],
)
def test_bad_input_names_argument_and_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**kwargs)


def test_position_of_a_bad_label_is_reported_in_the_callers_coordinates():
    target = TARGET.clone()
    target[1, 3] = 99
    with pytest.raises(ValueError, match=r"target\[1, 3\] = 99"):
        call(target=target)
    with pytest.raises(ValueError, match=r"target\[1, 3\] = 99"):
        call(target=target, shift=True)
    # the first label is never scored with shift=True, so it is not checked either
    first_bad = TARGET.clone()
    first_bad[:, 0] = 5
    call(target=first_bad, shift=True)


def test_a_custom_ignore_index_is_allowed_and_named():
    target = TARGET.clone()
    target[0, 0] = -1
    call(target=target, ignore_index=-1)
    target[0, 1] = -100
    with pytest.raises(ValueError, match=r"-100 is negative and is not ignore_index \(-1\)"):
        call(target=target, ignore_index=-1)


def test_unchecked_invalid_labels_poison_the_loss_instead_of_reading_out_of_bounds():
    target = TARGET.clone()
    target[0, 2] = 1000
    for backend in ("torch", "triton"):
        loss, stats = call(target=target, check_target=False, backend=backend, return_stats=True)
        assert torch.isnan(loss) and torch.isnan(stats.nll_sum)


def test_shift_needs_a_sequence_axis():
    with pytest.raises(ValueError, match=r"shift=True needs a sequence axis"):
        call(logits=torch.randn(17), target=torch.tensor(3), shift=True)


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*cpu"):
        call(backend="triton")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"label_smoothing.*-0.1"):
        lossplug.FusedCrossEntropyLoss(label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"backend must be one of.*'gpu'"):
        lossplug.FusedCrossEntropyLoss(backend="gpu")


def test_auto_sends_float64_on_cuda_to_the_torch_path():
    """The Triton kernels compute in float32: ``"auto"`` must not give them float64 CUDA logits."""
    from lossplug.ops import _dispatch

    class ClaimsCuda(torch.Tensor):  # what resolve sees of a CUDA tensor, on a CPU-only machine
        @property
        def is_cuda(self):
            return True

    chosen = {
        dtype: _dispatch.resolve("auto", "cross_entropy", LOGITS.to(dtype).as_subclass(ClaimsCuda))
        for dtype in (torch.float32, torch.float64)
    }
    assert chosen[torch.float32].__name__ == "lossplug.ops._triton.cross_entropy"
    assert chosen[torch.float64].__name__ == "lossplug.ops._torch.cross_entropy"


def test_float64_is_refused_by_triton_and_mixed_dtypes_by_name():
    hidden, weight = torch.randn(4, 8, dtype=torch.float64), torch.randn(11, 8)
    target = torch.randint(0, 11, (4,))
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype torch.float64"):
        lossplug.linear_cross_entropy(hidden, weight, target)
    with pytest.raises(TypeError, match=r"backend='triton'.*float64 hidden"):
        lossplug.linear_cross_entropy(hidden, weight.double(), target, backend="triton")
    with pytest.raises(TypeError, match=r"backend='triton'.*float64 logits"):
        lossplug.FusedCrossEntropyLoss(backend="triton")(LOGITS.double(), TARGET)


def test_auto_sends_linear_cross_entropy_on_cuda_to_the_cublas_path():
    """By the cost model (benchmarks/cost_model.py) the Triton linear backward's ~1e11 float32
    atomics are ~4x slower than the PyTorch path's cuBLAS matmuls: ``"auto"`` picks the latter
    on CUDA, ``"triton"`` still gives the kernels, and cross-entropy keeps its Triton default."""
    from lossplug.ops import _dispatch

    class ClaimsCuda(torch.Tensor):  # what resolve sees of a CUDA tensor, on a CPU-only machine
        @property
        def is_cuda(self):
            return True

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        hidden = torch.randn(4, 8).to(dtype).as_subclass(ClaimsCuda)
        auto = _dispatch.resolve("auto", "linear_cross_entropy", hidden, "hidden")
        chosen = _dispatch.resolve("triton", "linear_cross_entropy", hidden, "hidden")
        logits = _dispatch.resolve(
            "auto", "cross_entropy", LOGITS.to(dtype).as_subclass(ClaimsCuda)
        )
        assert auto.__name__ == "lossplug.ops._torch.linear_cross_entropy"
        assert chosen.__name__ == "lossplug.ops._triton.linear_cross_entropy"
        assert logits.__name__ == "lossplug.ops._triton.cross_entropy"
