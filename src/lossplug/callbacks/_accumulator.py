"""Framework-agnostic core of LossMonitor: token sums per window, reduced across ranks when read."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lossplug.ops.stats import TokenStats

#: The values LossMonitor can log, by name.
METRIC_NAMES = ("cross_entropy", "perplexity", "token_accuracy", "entropy")

Reduce = Callable[[torch.Tensor], torch.Tensor]


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
        packed = torch.stack(
            [
                stats.nll_sum.to(torch.float64),
                stats.tokens.to(torch.float64),
                stats.correct.to(torch.float64),
                stats.entropy_sum.to(torch.float64),
            ]
        )
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
        nll, tokens, correct, entropy = reduce(sums.clone()).tolist()
        values: dict[str, float] = {"tokens": tokens}
        if tokens > 0:
            values["cross_entropy"] = nll / tokens
            values["perplexity"] = math.exp(nll / tokens) if nll / tokens < 709 else math.inf
            values["token_accuracy"] = correct / tokens
            values["entropy"] = entropy / tokens
        return values

    def state(self) -> torch.Tensor | None:
        return None if self.sums is None else self.sums.detach().cpu()

    def load(self, sums: torch.Tensor | None) -> None:
        # kept on the CPU until the next add() moves the sum to the device of the stats
        self.sums = None if sums is None else sums.to(dtype=torch.float64)
