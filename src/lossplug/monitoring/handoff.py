"""How statistics computed inside a model reach the monitors, and how a KPI's are kept out.

A model changed by :func:`~lossplug.integrations.transformers.patch_causal_lm` computes a call's
:class:`~lossplug.TokenStats` with its loss and keeps them on a *source*, an object stored on the
model under :data:`SOURCE_ATTR`. The monitors find the sources in the module they watch and pop
the statistics after each batch. Nothing here knows which library the model comes from: a source
is anything with the attributes of :class:`StatsSource`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lossplug.ops.stats import TokenStats

#: The attribute of a model that holds its statistics source.
SOURCE_ATTR = "_lossplug_patch"


class StatsSource(Protocol):
    """What a model that computes its own statistics keeps: the last call's, taken once."""

    #: the statistics of the last call with labels, one sum per sequence, until taken
    last_stats: TokenStats | None
    #: the named inputs of that call, kept only while ``slice_by`` is set
    last_inputs: dict[str, Any] | None
    #: set by a monitor that splits evaluation values by slice of the data
    slice_by: Any

    def pop_token_stats(self) -> TokenStats | None:
        """``last_stats``, once."""

    def pop_inputs(self) -> dict[str, Any] | None:
        """``last_inputs``, once."""


def source_of(model: Any) -> StatsSource | None:
    """The statistics source of ``model``, or ``None`` when it computes none."""
    return getattr(model, SOURCE_ATTR, None)


def models_with_stats(module: nn.Module) -> list[nn.Module]:
    """The models inside ``module`` (``module`` itself included) that keep a statistics source."""
    if source_of(module) is not None:  # such models do not nest: no need to walk the model
        return [module]
    if not hasattr(module, "modules"):
        return []
    return [sub for sub in module.modules() if source_of(sub) is not None]


def pop_token_stats(
    models: nn.Module | Iterable[nn.Module], *, per_sequence: bool = False
) -> TokenStats | None:
    """The statistics of the last loss computed by the models in ``models``, each handed out once.

    ``models`` is a module (searched with :func:`models_with_stats`) or the models themselves;
    several models' statistics are summed (``per_sequence=False``) or their sequences are
    concatenated in the order of ``models`` (``per_sequence=True``). ``None`` when no model
    computed a loss since the last call.
    """
    if isinstance(models, nn.Module):
        models = models_with_stats(models)
    found = [stats for stats, _ in pop_stats_with_inputs(models)]
    if not found:
        return None
    if not per_sequence:
        return sum((stats.sum() for stats in found), TokenStats.zeros(found[0].device))
    if len(found) == 1:
        return found[0]
    return TokenStats(
        **{
            name: torch.cat([stats.as_dict()[name].reshape(-1) for stats in found])
            for name in found[0].as_dict()
        }
    )


def pop_stats_with_inputs(
    models: Iterable[nn.Module],
) -> list[tuple[TokenStats, dict[str, Any] | None]]:
    """Per model that computed a loss since the last pop: its per-sequence statistics and the
    named inputs of that call (``None`` unless ``slice_by`` asked for them)."""
    found = []
    for model in models:
        source = source_of(model)
        stats, inputs = source.pop_token_stats(), source.pop_inputs()
        if stats is not None:
            found.append((stats, inputs))
    return found


def keep_inputs_for(models: Iterable[nn.Module], slice_by: Any) -> None:
    """Make ``models`` keep each labelled call's inputs for ``slice_by`` (and take a key it
    names out of the call); ``None`` stops it."""
    for model in models:
        source_of(model).slice_by = slice_by


@contextlib.contextmanager
def calls_not_counted(module: Any) -> Iterator[None]:
    """Whatever the models in ``module`` compute inside the block is never handed to a monitor.

    A KPI that scores held-out rows with the model (a call with labels) must not add them to
    the training window: the statistics waiting to be taken when the block starts (the last
    training batch's, when a KPI runs before the monitor has taken them) are put back when it
    ends, and the block's own are dropped, whatever the order of the callbacks.
    """
    models = models_with_stats(module) if isinstance(module, nn.Module) else []
    saved = [(source_of(m), source_of(m).last_stats, source_of(m).last_inputs) for m in models]
    try:
        yield
    finally:
        for source, stats, inputs in saved:
            source.last_stats, source.last_inputs = stats, inputs
