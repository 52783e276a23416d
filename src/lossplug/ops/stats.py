"""Token-level statistics produced by the fused cross-entropy pass."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["TokenStats"]


# Not frozen: Lightning rebuilds dataclasses found in a step's outputs (to detach and move their
# tensors) and refuses frozen ones. eq=False: tensors have no single truth value.
@dataclass(eq=False)
class TokenStats:
    """Device-side sums over the scored (non-ignored) tokens of one or more batches.

    Every field is a 0-d tensor on the device of the logits, so building, merging and reading the
    properties never synchronises with the host; only turning a value into a Python number does.
    Sums are float64 so that billions of tokens add up without drift; counts are int64.

    Attributes:
        nll_sum: sum of the negative log-likelihood of the true token (natural log), float64.
        tokens: number of scored tokens, int64.
        correct: number of scored tokens whose argmax (first maximum) is the true token, int64.
        entropy_sum: sum of the entropy of the predictive distribution, float64.
        lse_sq_sum: sum of the squared log-sum-exp of the logits (what z-loss penalises), float64.

    Example:
        >>> import torch, lossplug
        >>> logits, target = torch.randn(4, 10), torch.tensor([1, 2, -100, 3])
        >>> loss, stats = lossplug.cross_entropy(logits, target, return_stats=True)
        >>> int(stats.tokens)
        3
        >>> bool(torch.isclose(stats.mean_nll, loss.double()))
        True
        >>> total = stats + stats
        >>> int(total.tokens)
        6
    """

    nll_sum: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor
    entropy_sum: torch.Tensor
    lse_sq_sum: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> TokenStats:
        """Stats of an empty stream: the neutral element of ``+``."""
        f64 = torch.zeros((), dtype=torch.float64, device=device)
        i64 = torch.zeros((), dtype=torch.int64, device=device)
        return cls(nll_sum=f64, tokens=i64, correct=i64, entropy_sum=f64, lse_sq_sum=f64)

    def __add__(self, other: TokenStats) -> TokenStats:
        if not isinstance(other, TokenStats):
            return NotImplemented
        return TokenStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def __radd__(self, other: object) -> TokenStats:
        # lets ``sum(list_of_stats)`` start from the integer 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to(self, device: torch.device | str) -> TokenStats:
        """A copy with every tensor moved to ``device``."""
        return TokenStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach(self) -> TokenStats:
        """A copy with every tensor detached from autograd."""
        return TokenStats(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The raw sums by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def device(self) -> torch.device:
        return self.nll_sum.device

    @property
    def mean_nll(self) -> torch.Tensor:
        """Mean cross-entropy in nats per token (nan when no token was scored)."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> torch.Tensor:
        """``exp(Σ nll / Σ tokens)``: the perplexity of everything the stats cover."""
        return torch.exp(self.mean_nll)

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of scored tokens whose argmax is the true token."""
        return self.correct.to(torch.float64) / self.tokens

    @property
    def entropy(self) -> torch.Tensor:
        """Mean entropy of the predictive distribution, in nats."""
        return self.entropy_sum / self.tokens

    @property
    def mean_lse_sq(self) -> torch.Tensor:
        """Mean squared log-sum-exp (the quantity z-loss keeps small)."""
        return self.lse_sq_sum / self.tokens
