"""Choose the backend of a fused op: Triton on CUDA when it imports and the cost model favours
it, chunked PyTorch otherwise.

The backends are modules; :class:`CrossEntropyBackend` and :class:`LinearCrossEntropyBackend`
state what each provides, and :data:`BACKEND_MODULES` names them with plain imports, so that an
editor's go-to-definition follows a call from the op into the code that runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol, overload, runtime_checkable

import torch

from lossplug.ops._spec import LinearGrads, LossSpec, NeededGrads, RowOutputs
from lossplug.ops._torch import cross_entropy as torch_cross_entropy
from lossplug.ops._torch import linear_cross_entropy as torch_linear_cross_entropy

BACKENDS = ("auto", "torch", "triton")

# Ops whose ``"auto"`` stays on the chunked PyTorch path on CUDA too. linear_cross_entropy: the
# Triton backward adds every tile's share of the hidden and weight gradients with float32 atomics,
# one per element of a [BLOCK_N, D] and a [BLOCK_V, D] tile for each of the N/BLOCK_N * V/BLOCK_V
# tiles; at language-model sizes that traffic outweighs the PyTorch path's three cuBLAS matmuls
# and its element-wise passes several times over (benchmarks/cost_model.py models both).
# backend="triton" still selects it.
TORCH_ON_CUDA = frozenset({"linear_cross_entropy"})


@runtime_checkable
class CrossEntropyBackend(Protocol):
    """What a cross-entropy backend module provides (``ops/_torch`` and ``ops/_triton``)."""

    #: whether the module also provides ``forward_with_grad`` (:class:`GradInForwardBackend`):
    #: a loss reduced to a scalar then gets its gradient in the forward sweep
    PRECOMPUTES_GRAD: bool

    def forward(self, logits: torch.Tensor, target: torch.Tensor, spec: LossSpec) -> RowOutputs:
        """The per-row outputs of ``logits [outer, inner, V]`` (vocabulary stride 1) against
        ``target [outer * inner]`` (int64)."""
        ...

    def backward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_rows: torch.Tensor,
        spec: LossSpec,
        grad_logits: torch.Tensor,
    ) -> None:
        """Write the gradient of ``Σ grad_rows * loss_rows`` into ``grad_logits`` (``logits``'
        shape; it may be ``logits`` itself, for ``inplace_backward``)."""
        ...


@runtime_checkable
class GradInForwardBackend(CrossEntropyBackend, Protocol):
    """A cross-entropy backend with ``PRECOMPUTES_GRAD = True``."""

    def forward_with_grad(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        spec: LossSpec,
        weight: torch.Tensor,
        grad_logits: torch.Tensor,
    ) -> RowOutputs:
        """:meth:`forward`, and the gradient of ``weight * Σ loss_rows`` written into
        ``grad_logits`` (``logits``' shape and dtype, never ``logits`` itself)."""
        ...


@runtime_checkable
class LinearCrossEntropyBackend(Protocol):
    """What a linear cross-entropy backend module provides."""

    #: whether ``forward`` can give the gradients of the summed loss (``needs`` not ``None``),
    #: which then need only scaling in the backward
    PRECOMPUTES_GRAD: bool

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        spec: LossSpec,
        *,
        needs: NeededGrads | None,
    ) -> tuple[RowOutputs, LinearGrads | None]:
        """The per-row outputs of ``hidden [N, D] @ weight.T [D, V] + bias`` against ``target
        [N]``, and the gradients (of hidden, weight, bias) of the summed loss where ``needs``
        asks for them and the backend precomputes."""
        ...

    def backward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_rows: torch.Tensor,
        spec: LossSpec,
        needs: NeededGrads,
    ) -> LinearGrads:
        """The gradients of ``Σ grad_rows * loss_rows`` that ``needs`` asks for."""
        ...


def _triton_cross_entropy() -> CrossEntropyBackend:
    # imported when first chosen: Triton is optional, and its modules import it
    from lossplug.ops._triton import cross_entropy as module

    return module


def _triton_linear_cross_entropy() -> LinearCrossEntropyBackend:
    from lossplug.ops._triton import linear_cross_entropy as module

    return module


Backend = CrossEntropyBackend | LinearCrossEntropyBackend


class OpBackends(NamedTuple):
    """The backend modules of one op: PyTorch's, and a function that imports Triton's."""

    torch_module: Backend
    import_triton: Callable[[], Backend]


#: Every op's backend modules, by the op's name.
BACKEND_MODULES: dict[str, OpBackends] = {
    "cross_entropy": OpBackends(
        torch_module=torch_cross_entropy,
        import_triton=_triton_cross_entropy,
    ),
    "linear_cross_entropy": OpBackends(
        torch_module=torch_linear_cross_entropy,
        import_triton=_triton_linear_cross_entropy,
    ),
}


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it is an optional dependency on machines without a GPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`; a ``ValueError`` naming it otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@overload
def resolve(
    backend: str, op: Literal["cross_entropy"], tensor: torch.Tensor, name: str = ...
) -> CrossEntropyBackend: ...
@overload
def resolve(
    backend: str, op: Literal["linear_cross_entropy"], tensor: torch.Tensor, name: str = ...
) -> LinearCrossEntropyBackend: ...
def resolve(backend: str, op: str, tensor: torch.Tensor, name: str = "logits") -> Backend:
    """The module with ``forward``/``backward`` of ``op`` for ``backend`` and ``tensor``'s device.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        op: the op's name, a key of :data:`BACKEND_MODULES`, e.g. ``"cross_entropy"``.
        tensor: the main input; its device and dtype (and ``op``) decide ``"auto"``.
        name: the argument ``tensor`` was passed as, for the error messages.
    """
    check_backend(backend)
    modules = BACKEND_MODULES[op]
    if backend == "auto":
        # the kernels compute in float32: float64 asks for more, which only PyTorch gives
        triton_fits = tensor.is_cuda and tensor.dtype != torch.float64 and op not in TORCH_ON_CUDA
        backend = "triton" if triton_fits and triton_available() else "torch"
    if backend == "torch":
        return modules.torch_module
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
    return modules.import_triton()
