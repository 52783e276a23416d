"""Framework-agnostic core of LossMonitor and LossplugCallback: token sums per window and per
slice of the data, reduced across ranks when read."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from lossplug.ops.stats import TokenStats

#: The values LossMonitor can log, by name.
METRIC_NAMES = ("cross_entropy", "perplexity", "token_accuracy", "entropy")
#: W&B summary of each logged value: its best, or the last one for the running token total.
SUMMARIES = {"cross_entropy": "min", "perplexity": "min", "token_accuracy": "max", "tokens": "last"}

Reduce = Callable[[torch.Tensor], torch.Tensor]
#: ``gather(names)``: the list of every rank's ``names``, in rank order (a collective under DDP).
Gather = Callable[[list[str]], list[list[str]]]


def pack(stats: TokenStats) -> torch.Tensor:
    """``[..., 4]`` float64: Σ nll, tokens, correct and Σ entropy, the sums every value needs."""
    f64 = torch.float64
    return torch.stack(
        [
            stats.nll_sum.to(f64),
            stats.tokens.to(f64),
            stats.correct.to(f64),
            stats.entropy_sum.to(f64),
        ],
        dim=-1,
    )


def values_of(nll: float, tokens: float, correct: float, entropy: float) -> dict[str, float]:
    """Every value of ``METRIC_NAMES`` (when a token was scored) and ``"tokens"`` from the reduced
    sums, read from a :class:`~lossplug.TokenStats`: the one home of their formulas."""
    values: dict[str, float] = {"tokens": tokens}
    if tokens > 0:
        f64 = torch.float64
        stats = TokenStats(
            nll_sum=torch.tensor(nll, dtype=f64),
            tokens=torch.tensor(int(tokens)),
            correct=torch.tensor(int(correct)),
            entropy_sum=torch.tensor(entropy, dtype=f64),
            lse_sq_sum=torch.zeros((), dtype=f64),
        )
        values["cross_entropy"] = float(stats.mean_nll)
        values["perplexity"] = float(stats.perplexity)  # inf, not an error, past e**709
        values["token_accuracy"] = float(stats.accuracy)
        values["entropy"] = float(stats.entropy)
    return values


class StatsAccumulator:
    """Sums of ``TokenStats`` since the last read; reading reduces them across ranks once.

    Adding never synchronises with the host; :meth:`read` does (one small all-reduce and one copy
    of four numbers), which is why it is only called at logging steps.

    Example:
        >>> import torch, lossplug
        >>> acc = StatsAccumulator()
        >>> _, stats = lossplug.cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 2]),
        ...                                   return_stats=True)
        >>> acc.add(stats)
        >>> round(acc.read(reduce=lambda t: t)["perplexity"], 6)
        4.0
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # float64 [nll, tokens, correct, entropy]

    def add(self, stats: TokenStats) -> None:
        packed = pack(stats)
        self.sums = packed if self.sums is None else packed + self.sums.to(packed.device)

    def reset(self) -> None:
        self.sums = None

    def read(self, reduce: Reduce) -> dict[str, float]:
        """Values over everything added since the last reset, summed over ranks by ``reduce``.

        Every rank must call this together (``reduce`` is a collective under DDP). Returns the
        token count under ``"tokens"`` and, when it is not zero, every value of ``METRIC_NAMES``.
        """
        sums = self.sums
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64)
        return values_of(*reduce(sums.clone()).tolist())

    def state(self) -> torch.Tensor | None:
        return None if self.sums is None else self.sums.detach().cpu()

    def load(self, sums: torch.Tensor | None) -> None:
        # kept on the CPU until the next add() moves the sum to the device of the stats
        self.sums = None if sums is None else sums.to(dtype=torch.float64)


class SliceAccumulator:
    """Token sums per slice of the data (one label per sequence), reduced across ranks when read.

    Slices are named by their labels (``str(label)``); a slice seen on only some ranks is summed
    over those ranks. Adding never synchronises with the host: string labels are mapped to slice
    numbers on the host, and integer labels in a tensor stay on the device until :meth:`read`
    (or until many batches are pending, to keep memory bounded).

    Example:
        >>> import torch, lossplug
        >>> acc = SliceAccumulator()
        >>> logits, labels = torch.zeros(3, 4, 5), torch.randint(0, 5, (3, 4))
        >>> _, stats = lossplug.cross_entropy(logits, labels, return_stats=True,
        ...                                   per_sequence_stats=True)
        >>> acc.add(stats, ["code", "prose", "code"])
        >>> values = acc.read(reduce=lambda t: t, gather=lambda names: [names])
        >>> values["code"]["tokens"], round(values["prose"]["perplexity"], 6)
        (8.0, 5.0)
    """

    #: pending batches of integer labels kept on the device before they are grouped
    MAX_PENDING = 256

    def __init__(self) -> None:
        self.names: list[str] = []
        self._numbers: dict[str, int] = {}
        self.sums: torch.Tensor | None = None  # float64 [slices, 4], in the order of names
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (int labels, [B, 4] sums)

    def add(self, stats: TokenStats, labels: Sequence[str] | torch.Tensor) -> None:
        """Add per-sequence ``stats`` (fields of shape ``[B]``) with one label per sequence:
        names (already validated strings) or an integer tensor."""
        packed = pack(stats).reshape(-1, 4)
        if isinstance(labels, torch.Tensor):
            self._pending.append((labels.reshape(-1).to(packed.device), packed))
            if len(self._pending) >= self.MAX_PENDING:
                self._settle()
            return
        numbers = [self._number(name) for name in labels]
        self._group(torch.tensor(numbers, dtype=torch.int64).to(packed.device), packed)

    def _number(self, name: str) -> int:
        number = self._numbers.get(name)
        if number is None:
            number = self._numbers[name] = len(self.names)
            self.names.append(name)
        return number

    def _group(self, numbers: torch.Tensor, packed: torch.Tensor) -> None:
        grouped = torch.zeros(len(self.names), 4, dtype=torch.float64, device=packed.device)
        grouped.index_add_(0, numbers, packed)
        if self.sums is not None:
            grouped[: len(self.sums)] += self.sums.to(packed.device)
        self.sums = grouped

    def _settle(self) -> None:
        """Group the pending integer labels (one copy of the labels to the host)."""
        pending, self._pending = self._pending, []
        for labels, packed in pending:
            numbers = [self._number(str(label)) for label in labels.tolist()]
            self._group(torch.tensor(numbers, dtype=torch.int64).to(packed.device), packed)

    def reset(self) -> None:
        self.names, self._numbers, self.sums, self._pending = [], {}, None, []

    def read(self, reduce: Reduce, gather: Gather) -> dict[str, dict[str, float]]:
        """Values per slice over everything added since the last reset, on every rank.

        Every rank must call this together (``gather`` and ``reduce`` are collectives under
        DDP): the slices are the union of every rank's, sorted by name.
        """
        self._settle()
        names = sorted(set().union(*gather(list(self.names))))
        if not names:
            return {}
        device = self.sums.device if self.sums is not None else torch.device("cpu")
        local = torch.zeros(len(names), 4, dtype=torch.float64, device=device)
        if self.sums is not None:
            where = {name: i for i, name in enumerate(names)}
            rows = torch.tensor([where[name] for name in self.names], device=device)
            local.index_copy_(0, rows, self.sums)
        totals = reduce(local).tolist()
        return {name: values_of(*row) for name, row in zip(names, totals, strict=True)}


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
    return [_slice_name(where, label) for label in labels]


def _count_message(where: str, got: int, shape: torch.Size) -> str:
    return (
        f"{where} gave {got} labels, but the batch's statistics hold "
        f"{math.prod(shape)} sequences (shape {tuple(shape)}): give one label per sequence "
        "(per row of the labels, whose last axis is the sequence)"
    )


def _slice_name(where: str, label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, (str, numbers.Integral)):
        raise TypeError(f"{where} labels must be str or int, got {label!r}")
    name = str(label)
    if not name or "/" in name or not name.isprintable():
        raise ValueError(
            f"{where} label {label!r} cannot name a slice: it must be non-empty, printable and "
            "hold no '/' (it becomes the last part of val/<metric>/<slice>)"
        )
    return name


class LossComparison(NamedTuple):
    """How the loss a step returned compares with the monitor's own cross-entropy.

    Attributes:
        batches: micro-batches compared.
        loss: mean over them of the loss the step returned (per micro-batch, as trained).
        cross_entropy: mean over them of the monitor's mean NLL per scored token.
        agrees: the two agree within the tolerance, or the loss is the summed NLL (a
            ``reduction="sum"`` loss: the same numbers, reduced differently).
        other_shift: what the other ``shift`` convention would give on the same logits (estimated
            on the tokens scored both ways), or ``None`` when it could not be computed.
        other_shift_agrees: ``other_shift`` explains the loss far better than the current one.
    """

    batches: int
    loss: float
    cross_entropy: float
    agrees: bool
    other_shift: float | None
    other_shift_agrees: bool


class LossCheck:
    """Sums, on the device, of the loss each micro-batch trained on and of the monitor's numbers.

    Adding never synchronises with the host: each micro-batch adds one small stacked tensor.
    :meth:`compare` reads the sums (one copy of seven numbers), so it belongs where the monitor
    synchronises anyway, at a logging step. Micro-batches with no scored token or a non-finite
    loss are left out: they have no mean to compare.

    Means per micro-batch are compared, not token-weighted means, because that is what a
    ``"mean"`` loss is: an exact match then holds under gradient accumulation and whatever the
    share of ignored tokens in each micro-batch.

    Example:
        >>> import torch, lossplug
        >>> check = LossCheck()
        >>> logits, target = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
        >>> loss, stats = lossplug.cross_entropy(logits, target, return_stats=True)
        >>> check.add(loss, stats)
        >>> check.compare(rtol=0.02, atol=1e-3).agrees
        True
    """

    def __init__(self) -> None:
        # float64 [batches, Σ loss, Σ mean nll, Σ nll sum, batches with other, Σ loss, Σ other]
        self.sums: torch.Tensor | None = None

    def add(
        self,
        loss: torch.Tensor,
        stats: TokenStats,
        other_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add one micro-batch: its trained ``loss`` (a scalar tensor), the monitor's ``stats``
        of it and, optionally, ``(Σ nll, tokens)`` under the other ``shift`` convention."""
        f64 = torch.float64
        tokens = stats.tokens.to(f64)
        loss = loss.detach().to(device=tokens.device, dtype=f64).reshape(())
        ok = (tokens > 0) & torch.isfinite(loss)
        zero = torch.zeros((), dtype=f64, device=tokens.device)
        nll_sum = stats.nll_sum.to(f64)
        row = [
            ok.to(f64),
            torch.where(ok, loss, zero),
            torch.where(ok, nll_sum / tokens.clamp(min=1), zero),
            torch.where(ok, nll_sum, zero),
        ]
        if other_shift is None:
            row += [zero, zero, zero]
        else:
            other_sum, other_tokens = (t.to(device=tokens.device, dtype=f64) for t in other_shift)
            other_ok = ok & (other_tokens > 0)
            row += [
                other_ok.to(f64),
                torch.where(other_ok, loss, zero),
                torch.where(other_ok, other_sum / other_tokens.clamp(min=1), zero),
            ]
        packed = torch.stack(row)
        self.sums = packed if self.sums is None else self.sums.to(packed.device) + packed

    def reset(self) -> None:
        self.sums = None

    def compare(self, rtol: float, atol: float) -> LossComparison | None:
        """The comparison since the last call (``None`` if no micro-batch could be compared);
        then starts again. Synchronises with the host."""
        sums, self.sums = self.sums, None
        if sums is None:
            return None
        batches, loss, mean_nll, nll_sum, other_batches, other_loss, other = sums.tolist()
        if batches == 0:
            return None
        loss, mean_nll, nll_sum = loss / batches, mean_nll / batches, nll_sum / batches
        agrees = _close(loss, mean_nll, rtol, atol) or _close(loss, nll_sum, rtol, atol)
        other_mean, other_agrees = None, False
        if other_batches > 0:
            other_mean, other_loss = other / other_batches, other_loss / other_batches
            # an estimate on a subset of the tokens: it need not match to rounding, only explain
            # the loss far better than the current convention does
            gap = abs(mean_nll - loss) / max(abs(loss), atol)
            other_gap = abs(other_mean - other_loss) / max(abs(other_loss), atol)
            other_agrees = other_gap <= max(2 * rtol, gap / 4)
        return LossComparison(int(batches), loss, mean_nll, agrees, other_mean, other_agrees)


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def other_shift_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    nll: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(Σ nll, tokens)`` under the other ``shift`` convention, from this one's per-token NLL.

    A row's log-sum-exp does not depend on its label, so ``lse = nll + x[label]`` and the NLL of
    any other label is ``lse - x[other]``: two gathers of one logit per row, no pass over the
    vocabulary. Only positions ``t < T - 1`` whose labels ``t`` and ``t + 1`` are both scored
    count, so this is an estimate on most, not all, of the tokens.

    Args:
        logits: ``[..., T, V]`` as given to the op.
        labels: ``[..., T]`` as given to the op.
        nll: the op's ``reduction="none"`` output for them (``[..., T - 1]`` when ``shift``).
        shift: the convention ``nll`` was computed with.
        ignore_index: as given to the op.
        softcap: as given to the op.

    Returns:
        Device tensors (no host synchronisation), or ``None`` when the shapes have no sequence
        axis of two positions or more.
    """
    if labels.dim() < 1 or labels.shape[-1] < 2 or logits.dim() != labels.dim() + 1:
        return None
    f64, vocab = torch.float64, logits.shape[-1]
    rows = logits.detach()[..., :-1, :]  # a view: positions 0 … T - 2
    labels = labels.to(torch.int64)
    early, late = labels[..., :-1], labels[..., 1:]
    both = (early != ignore_index) & (late != ignore_index)
    both &= (early >= 0) & (early < vocab) & (late >= 0) & (late < vocab)  # safe to gather
    now, other = (late, early) if shift else (early, late)

    def logit(index: torch.Tensor) -> torch.Tensor:
        x = rows.gather(-1, torch.where(both, index, 0).unsqueeze(-1)).squeeze(-1).to(f64)
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    nll_rows = (nll if shift else nll[..., :-1]).to(f64)
    other_nll = torch.where(both, nll_rows + logit(now) - logit(other), 0.0)
    return other_nll.sum(), both.sum()
