"""Slices of the evaluation data: which label each sequence carries, checked against the stats."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lossplug.ops.stats import slice_name


def check_slice_by(slice_by: Any) -> None:
    """Refuse a ``slice_by`` that is neither ``None``, a batch key nor a function."""
    if slice_by is None or callable(slice_by):
        return
    if not isinstance(slice_by, str):
        raise TypeError(
            f"slice_by must be None, the name of a batch key or a function batch -> labels, "
            f"got {slice_by!r}"
        )
    if not slice_by:
        raise ValueError("slice_by must name a key of the batch, got ''")


def slice_labels(
    slice_by: str | Callable[[Any], Any],
    batch: Any,
    shape: torch.Size,
    *,
    owner: str = "LossMonitor",
) -> list[str] | torch.Tensor:
    """The slice label of every sequence of ``batch``, checked against the statistics' shape.

    Returns the names (``str`` of each label) or, for an integer tensor, the tensor itself (it
    may live on the device: its values are read later, where the monitor synchronises anyway).
    """
    where = f"slice_by={slice_by!r}" if isinstance(slice_by, str) else "slice_by(batch)"
    if isinstance(slice_by, str):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{owner}(slice_by={slice_by!r}) reads a key of a dict batch, but the batch "
                f"is a {type(batch).__name__}: pass slice_by=fn with fn(batch) -> labels"
            )
        if slice_by not in batch:
            raise KeyError(
                f"{owner}(slice_by={slice_by!r}): the batch has no key {slice_by!r} "
                f"(its keys: {sorted(map(str, batch))})"
            )
        labels = batch[slice_by]
    else:
        labels = slice_by(batch)
    count = math.prod(shape)
    if isinstance(labels, torch.Tensor) or type(labels).__module__ == "numpy":
        labels = torch.as_tensor(labels) if not isinstance(labels, torch.Tensor) else labels
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(
                f"{where} must give one int or str label per sequence, got a tensor of "
                f"dtype {labels.dtype}"
            )
        if labels.numel() != count:
            raise ValueError(_count_message(where, labels.numel(), shape))
        return labels.detach()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(
            f"{where} must give a sequence of labels (one per sequence of the batch), got "
            f"{labels!r}"
        )
    if len(labels) != count:
        raise ValueError(_count_message(where, len(labels), shape))
    return [slice_name(label, where, "val/<metric>/<slice>") for label in labels]


def _count_message(where: str, got: int, shape: torch.Size) -> str:
    return (
        f"{where} gave {got} labels, but the batch's statistics hold "
        f"{math.prod(shape)} sequences (shape {tuple(shape)}): give one label per sequence "
        "(per row of the labels, whose last axis is the sequence)"
    )
