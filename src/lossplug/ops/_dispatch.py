"""Choose the backend of a fused op: Triton on CUDA when it imports and the cost model favours
it, chunked PyTorch otherwise."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")

# Ops whose ``"auto"`` stays on the chunked PyTorch path on CUDA too. linear_cross_entropy: at
# DESIGN's shape (N=8192, D=4096, V=128256, bf16) the Triton backward adds its [64, D] and
# [128, D] tile gradients with ~1.0e11 float32 atomics per call, whose HBM traffic alone is
# ~240 ms on an H100, 5.4x DESIGN's 45 ms target; the PyTorch path runs its three matmuls on
# cuBLAS (26 ms at peak) plus ~33 ms of elementwise passes, ~59 ms in all: about 4x faster by the
# model of benchmarks/cost_model.py (benchmarks/RESULTS.md). backend="triton" still selects it.
TORCH_ON_CUDA = frozenset({"linear_cross_entropy"})


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it is an optional dependency on machines without a GPU)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, op: str, tensor: torch.Tensor, name: str = "logits") -> ModuleType:
    """The module with ``forward``/``backward`` of ``op`` for ``backend`` and ``tensor``'s device.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        op: the op's module name, e.g. ``"cross_entropy"``.
        tensor: the main input; its device and dtype (and ``op``) decide ``"auto"``.
        name: the argument ``tensor`` was passed as, for the error messages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # the kernels compute in float32: float64 asks for more, which only PyTorch gives
        triton_fits = tensor.is_cuda and tensor.dtype != torch.float64 and op not in TORCH_ON_CUDA
        backend = "triton" if triton_fits and triton_available() else "torch"
    if backend == "torch":
        return importlib.import_module(f"lossplug.ops._torch.{op}")
    if tensor.dtype == torch.float64:
        raise TypeError(
            f"backend='triton' computes in float32 and does not take float64 {name} "
            f"(got dtype {tensor.dtype}): use backend='torch' or 'auto' for float64, "
            "or cast to float32"
        )
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if not tensor.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}); "
            "set TRITON_INTERPRET=1 before importing lossplug to run the kernels on the CPU"
        )
    return importlib.import_module(f"lossplug.ops._triton.{op}")
