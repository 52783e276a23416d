"""What every lossplug metric shares: the three update forms and the summed, synced states."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
from torchmetrics import Metric

from lossplug.ops._dispatch import check_backend
from lossplug.ops._spec import LossSpec
from lossplug.ops.cross_entropy import measure_logits
from lossplug.ops.stats import TokenStats

_STATE_FIELDS = {
    "nll_sum": torch.float64,
    "tokens": torch.int64,
    "correct": torch.int64,
    "entropy_sum": torch.float64,
}


def _metric_spec(
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    full_stats: bool = False,
) -> LossSpec:
    """The spec of a metric's forward-only pass: the options the metrics take, validated.

    The loss itself is not read (a sum, no smoothing, no z-loss), and ``full_stats`` says
    whether the argmax and entropy are (accuracy, entropy): the NLL alone is much cheaper on
    the CPU.
    """
    return LossSpec.validated(
        ignore_index=ignore_index,
        reduction="sum",
        softcap=softcap,
        shift=shift,
        full_stats=full_stats,
    )


def _token_stats_update(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    spec: LossSpec,
    backend: str,
    per_sequence: bool = False,
) -> TokenStats:
    """The :class:`~lossplug.TokenStats` of one update, from whichever form the caller has.

    Forms: ``(logits, target)`` runs the fused op forward-only with ``spec`` (no autograd graph
    kept); ``(stats,)`` takes a ``TokenStats`` already computed by the training loss;
    ``(losses, mask)`` takes per-token negative log-likelihoods and a bool mask of the scored
    tokens, which carry no predictions (refused when ``spec.full_stats`` asks for them).
    ``per_sequence`` asks for one sum per sequence (the last axis of the target), as
    ``per_sequence_stats`` in the ops; a ``TokenStats`` is then returned as given.
    """
    if isinstance(preds, TokenStats):
        if target is not None or mask is not None:
            raise ValueError("update(stats) takes a TokenStats alone: pass no target and no mask")
        return preds.detach() if per_sequence else preds.detach().sum()
    if not isinstance(preds, torch.Tensor):
        raise TypeError(
            "update takes (logits, target), (stats,) or (losses, mask); "
            f"got preds of type {type(preds).__name__}"
        )
    if mask is not None or (target is not None and target.dtype == torch.bool):
        if mask is not None and target is not None:
            raise ValueError("pass either target (with logits) or mask (with losses), not both")
        if spec.full_stats:
            raise ValueError(
                "per-token losses carry no predictions: this metric needs update(logits, target) "
                "or update(stats)"
            )
        return _stats_from_losses(preds, mask if mask is not None else target, per_sequence)
    if target is None:
        raise ValueError(
            "update needs a target: update(logits, target), update(stats) or update(losses, mask)"
        )
    _, stats = measure_logits(preds, target, spec, backend=backend, per_sequence_stats=per_sequence)
    return stats


def _stats_from_losses(
    losses: torch.Tensor, mask: torch.Tensor, per_sequence: bool = False
) -> TokenStats:
    if not losses.is_floating_point():
        raise TypeError(f"losses must be a float tensor of per-token NLL, got dtype {losses.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = scored token), got dtype {mask.dtype}")
    if mask.shape != losses.shape:
        raise ValueError(
            f"mask.shape {tuple(mask.shape)} must equal losses.shape {tuple(losses.shape)}"
        )
    if per_sequence and losses.dim() < 1:
        raise ValueError("per-sequence sums need losses with a sequence axis, got a 0-d tensor")
    losses = torch.where(mask, losses.detach(), 0)
    if per_sequence:
        nll_sum, tokens = losses.sum(-1, dtype=torch.float64), mask.sum(-1, dtype=torch.int64)
    else:
        nll_sum, tokens = losses.sum(dtype=torch.float64), mask.sum(dtype=torch.int64)
    zero = torch.zeros_like(nll_sum)
    return TokenStats(
        nll_sum=nll_sum,
        tokens=tokens,
        correct=torch.zeros_like(nll_sum, dtype=torch.int64),
        entropy_sum=zero,
        lse_sq_sum=zero,
    )


def _state_suffix(spec: LossSpec) -> str:
    # Metrics whose configuration changes the sums get different state names, so that a
    # MetricCollection never puts them in one compute group; equal configurations share states.
    # NLL-only metrics (perplexity, cross-entropy) leave the accuracy and entropy sums empty, so
    # they never share states with the metrics that read those. The key is that of the first
    # releases: the state names are in saved checkpoints.
    key = repr((spec.ignore_index, spec.shift, spec.softcap, spec.full_stats))
    return hashlib.sha1(key.encode()).hexdigest()[:8]


class _TokenStatsMetric(Metric):
    """A torchmetrics ``Metric`` whose state is the sums of a ``TokenStats``, reduced by ``sum``."""

    is_differentiable = False
    full_state_update = False
    # whether the metric reads the accuracy or entropy sums (LossSpec.full_stats)
    _full_stats = False

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        shift: bool = False,
        softcap: float | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = _metric_spec(
            ignore_index=ignore_index,
            shift=shift,
            softcap=softcap,
            full_stats=self._full_stats,
        )
        self.backend = check_backend(backend)
        self._suffix = _state_suffix(self.spec)
        self._warned_empty = False
        for field, dtype in _STATE_FIELDS.items():
            self.add_state(
                self._state_name(field),
                default=torch.zeros((), dtype=dtype),
                dist_reduce_fx="sum",
                persistent=True,
            )

    @property
    def ignore_index(self) -> int:
        """The target value that is not scored."""
        return self.spec.ignore_index

    @property
    def shift(self) -> bool:
        """Whether position ``t`` is scored against ``target[..., t + 1]``."""
        return self.spec.shift

    @property
    def softcap(self) -> float | None:
        """The soft-cap applied to the logits before the softmax (``None``: none)."""
        return self.spec.softcap

    def _state_name(self, field: str) -> str:
        return f"{field}_{self._suffix}"

    def update(
        self,
        preds: torch.Tensor | TokenStats,
        target: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: ``(logits, target)``, ``(stats)`` or ``(losses, mask)``.

        ``logits`` may be float32, float16, bfloat16 or float64 (scored in float64 on the PyTorch
        path; ``backend="auto"`` picks it, ``"triton"`` refuses float64). The states stay the
        float64/int64 sums of :class:`~lossplug.TokenStats` whatever the dtype.
        """
        stats = _token_stats_update(preds, target, mask=mask, spec=self.spec, backend=self.backend)
        for field in _STATE_FIELDS:
            name = self._state_name(field)
            setattr(self, name, getattr(self, name) + getattr(stats, field).to(self.device))

    @property
    def stats(self) -> TokenStats:
        """The accumulated sums as a :class:`~lossplug.TokenStats` (``lse_sq_sum`` not kept)."""
        values = {field: getattr(self, self._state_name(field)) for field in _STATE_FIELDS}
        return TokenStats(**values, lse_sq_sum=torch.zeros_like(values["nll_sum"]))

    def _checked_stats(self) -> TokenStats:
        stats = self.stats
        # compute() is where values are read anyway: one host sync here is expected
        if int(stats.tokens) == 0 and not self._warned_empty and self._update_count > 0:
            self._warned_empty = True
            warnings.warn(
                f"{type(self).__name__}.compute(): no token has been scored yet (every target "
                f"was ignore_index={self.ignore_index}); returning nan",
                UserWarning,
                stacklevel=3,
            )
        return stats

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot one value or a sequence of values, with the metric's bounds (needs matplotlib)."""
        return self._plot(val, ax)
