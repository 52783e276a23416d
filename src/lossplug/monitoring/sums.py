"""Token sums per window and per slice of the data, reduced across ranks when read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lossplug.ops.stats import TokenStats

Reduce = Callable[[torch.Tensor], torch.Tensor]
#: ``gather(names)``: the list of every rank's ``names``, in rank order (a collective under DDP).
Gather = Callable[[list[str]], list[list[str]]]


def identity(tensor: torch.Tensor) -> torch.Tensor:
    """The reduction of a single process."""
    return tensor


def single_process(names: list[str]) -> list[list[str]]:
    """The gather of a single process."""
    return [names]


def gather_across_processes(names: list[str]) -> list[list[str]]:
    """Every process's ``names`` through ``torch.distributed``, in rank order; every process of
    the initialised process group must call it together."""
    everyone: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, names)
    return everyone


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
    """Every metric value (when a token was scored) and ``"tokens"`` from the reduced sums, read
    from a :class:`~lossplug.TokenStats`: the one home of their formulas."""
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
        token count under ``"tokens"`` and, when it is not zero, every metric value.
        """
        return values_of(*self.reduced(reduce).tolist())

    def reduced(self, reduce: Reduce) -> torch.Tensor:
        """The sums since the last reset (zeros when nothing was added), summed over ranks by
        ``reduce``; every rank must call this together."""
        sums = self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64)
        return reduce(sums.clone())

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
