"""Choose the backend of a fused op: Triton on CUDA when it imports, chunked PyTorch otherwise."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


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


def resolve(backend: str, op: str, tensor: torch.Tensor) -> ModuleType:
    """The module with ``forward``/``backward`` of ``op`` for ``backend`` and ``tensor``'s device.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        op: the op's module name, e.g. ``"cross_entropy"``.
        tensor: the main input; its device decides ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return importlib.import_module(f"lossplug.ops._torch.{op}")
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if not tensor.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}); "
            "set TRITON_INTERPRET=1 before importing lossplug to run the kernels on the CPU"
        )
    return importlib.import_module(f"lossplug.ops._triton.{op}")
