"""All the model-centric metrics of a language model from one pass: functional form and Metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lossplug.metrics._token_stats import (
    _STATE_FIELDS,
    _metric_spec,
    _token_stats_update,
    _TokenStatsMetric,
)
from lossplug.ops.stats import TokenStats, slice_name

__all__ = ["LanguageModelMetrics", "language_model_metrics"]


def _language_model_metrics_compute(stats: TokenStats) -> dict[str, torch.Tensor]:
    # each value by its key (the name it is logged under), read from the TokenStats property
    # that is its formula
    return {
        "cross_entropy": stats.mean_nll,
        "perplexity": stats.perplexity,
        "token_accuracy": stats.accuracy,
        "entropy": stats.entropy,
        "tokens": stats.tokens,
    }


def language_model_metrics(
    preds: torch.Tensor | TokenStats,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Cross-entropy, perplexity, token accuracy, entropy and the token count from one pass.

    Example:
        >>> import torch
        >>> from lossplug.metrics.functional import language_model_metrics
        >>> values = language_model_metrics(torch.zeros(4, 2), torch.tensor([0, 1, 0, -100]))
        >>> round(float(values["perplexity"]), 6), int(values["tokens"])
        (2.0, 3)
    """
    spec = _metric_spec(ignore_index=ignore_index, shift=shift, softcap=softcap, full_stats=True)
    stats = _token_stats_update(preds, target, spec=spec, backend=backend)
    return _language_model_metrics_compute(stats)


class LanguageModelMetrics(_TokenStatsMetric):
    """One update, every model-centric value: ``compute()`` returns a dict of float64 tensors.

    Keys: ``cross_entropy``, ``perplexity``, ``token_accuracy``, ``entropy`` and ``tokens``.

    With ``slices=(name, ...)`` it also keeps them per slice of the data (the data source, the
    task): ``update(..., slices=labels)`` takes one label per sequence, and ``compute()`` adds
    ``"<key>/<slice>"`` for every slice, token-weighted and exact like the overall values (the
    slices' sums add up to them), summed across processes like every state. Labels are slice
    names (``str``, or ``int`` matched against the names as text) or an integer tensor of
    positions in ``slices``, which stays on the device. Per-sequence statistics come from the
    same pass (``per_sequence_stats`` of the ops); ``update(stats)`` needs stats computed with it.

    Args:
        slices: the names of the slices, each non-empty, printable and without ``/``.
        ignore_index: as in :func:`lossplug.cross_entropy`; likewise ``shift``, ``softcap``,
            ``backend``.

    Example:
        >>> import torch
        >>> from lossplug.metrics import LanguageModelMetrics
        >>> metric = LanguageModelMetrics(slices=("code", "prose"))
        >>> metric.update(torch.zeros(3, 4, 16), torch.randint(0, 16, (3, 4)),
        ...               slices=["code", "prose", "code"])
        >>> values = metric.compute()
        >>> int(values["tokens/code"]), int(values["tokens/prose"]), int(values["tokens"])
        (8, 4, 12)

    Example:
        >>> import torch
        >>> from lossplug.metrics import LanguageModelMetrics
        >>> metric = LanguageModelMetrics(shift=True)
        >>> metric.update(torch.zeros(2, 4, 16), torch.randint(0, 16, (2, 4)))
        >>> values = metric.compute()
        >>> round(float(values["perplexity"]), 6), int(values["tokens"])
        (16.0, 6)
    """

    higher_is_better = None
    _full_stats = True

    def __init__(self, *, slices: Sequence[str | int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slices = _slice_names(slices)
        self._positions = {name: i for i, name in enumerate(self.slices)}
        for field, dtype in _STATE_FIELDS.items():
            if self.slices:
                self.add_state(
                    self._state_name(f"slice_{field}"),
                    default=torch.zeros(len(self.slices), dtype=dtype),
                    dist_reduce_fx="sum",
                    persistent=True,
                )

    def update(
        self,
        preds: torch.Tensor | TokenStats,
        target: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        slices: Sequence[str | int] | torch.Tensor | None = None,
    ) -> None:
        """Add one batch (see :class:`~lossplug.metrics.Perplexity` for the forms) and, when the
        metric has ``slices``, the slice label of each of its sequences."""
        if (slices is None) != (not self.slices):
            raise ValueError(
                "update(..., slices=labels) needs LanguageModelMetrics(slices=(names...)), and a "
                f"metric with slices needs labels at every update (slices={self.slices!r}, got "
                f"labels {slices!r})"
            )
        if slices is None:
            super().update(preds, target, mask=mask)
            return
        stats = _token_stats_update(
            preds, target, mask=mask, spec=self.spec, backend=self.backend, per_sequence=True
        )
        if stats.shape == ():
            raise ValueError(
                "update(stats, slices=...) needs one statistic per sequence: compute the stats "
                "with lossplug.cross_entropy(..., return_stats=True, per_sequence_stats=True)"
            )
        positions = self._slice_positions(slices, stats.shape)
        by_slice = stats.sum_by(positions, len(self.slices))
        total = stats.sum()
        for field in _STATE_FIELDS:
            name, sliced = self._state_name(field), self._state_name(f"slice_{field}")
            setattr(self, name, getattr(self, name) + getattr(total, field).to(self.device))
            setattr(self, sliced, getattr(self, sliced) + getattr(by_slice, field).to(self.device))

    def _slice_positions(
        self, labels: Sequence[str | int] | torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        count = int(torch.Size(shape).numel())
        if isinstance(labels, torch.Tensor):
            if (
                labels.dtype.is_floating_point
                or labels.dtype.is_complex
                or labels.dtype == torch.bool
            ):
                raise TypeError(
                    f"slices must be names or an integer tensor of positions, got dtype "
                    f"{labels.dtype}"
                )
            if labels.numel() != count:
                raise ValueError(f"slices has {labels.numel()} labels for {count} sequences")
            if (
                labels.device.type == "cpu"
                and labels.numel()
                and not (int(labels.min()) >= 0 and int(labels.max()) < len(self.slices))
            ):  # a CPU tensor is checked for free; a device one is not read (no sync)
                raise ValueError(
                    f"slices holds positions outside [0, {len(self.slices)}) of "
                    f"slices={self.slices!r}: {labels.tolist()}"
                )
            return labels.reshape(shape)
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(f"slices must be a sequence of labels, got {labels!r}")
        if len(labels) != count:
            raise ValueError(f"slices has {len(labels)} labels for {count} sequences")
        positions = []
        for label in labels:
            position = self._positions.get(str(label)) if not isinstance(label, bool) else None
            if position is None:
                raise ValueError(f"slice label {label!r} is not one of slices={self.slices!r}")
            positions.append(position)
        return torch.tensor(positions, dtype=torch.int64).reshape(shape)

    def compute(self) -> dict[str, torch.Tensor]:
        values = _language_model_metrics_compute(self._checked_stats())
        if self.slices:
            sliced = TokenStats(
                **{f: getattr(self, self._state_name(f"slice_{f}")) for f in _STATE_FIELDS},
                lse_sq_sum=torch.zeros(len(self.slices), dtype=torch.float64),
            )
            per_slice = _language_model_metrics_compute(sliced)
            for i, name in enumerate(self.slices):
                values.update({f"{key}/{name}": value[i] for key, value in per_slice.items()})
        return values


def _slice_names(slices: Sequence[str | int] | None) -> tuple[str, ...]:
    if slices is None:
        return ()
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
        raise TypeError(f"slices must be a sequence of slice names, got {slices!r}")
    names = [slice_name(label, "slices", "<key>/<slice>") for label in slices]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"slices must name at least one slice, without repeats, got {slices!r}")
    return tuple(names)
