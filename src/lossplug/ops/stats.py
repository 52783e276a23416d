"""Token-level statistics produced by the fused cross-entropy pass."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["TokenStats", "slice_name"]


# Not frozen: Lightning rebuilds dataclasses found in a step's outputs (to detach and move their
# tensors) and refuses frozen ones. eq=False: tensors have no single truth value.
@dataclass(eq=False)
class TokenStats:
    """Device-side sums over the scored (non-ignored) tokens of one or more batches.

    Every field is a tensor on the device of the logits, so building, merging and reading the
    properties never synchronises with the host; only turning a value into a Python number does.
    Sums are float64 so that billions of tokens add up without drift; counts are int64. The fields
    are 0-d sums over a whole pass, or, with ``per_sequence_stats=True`` in the ops, one sum per
    sequence (shape ``target.shape[:-1]``), which :meth:`sum_by` adds up per slice of the data
    and :meth:`sum` over everything; the properties work element by element either way.

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
    def shape(self) -> torch.Size:
        """Shape of every field: ``()`` for the sums of a pass, ``[B]`` per sequence."""
        return self.nll_sum.shape

    def sum(self) -> TokenStats:
        """The 0-d sums over every sequence (a copy of 0-d stats as they are).

        Example:
            >>> import torch, lossplug
            >>> logits, labels = torch.zeros(3, 4, 5), torch.randint(0, 5, (3, 4))
            >>> _, stats = lossplug.cross_entropy(logits, labels, shift=True, return_stats=True,
            ...                                   per_sequence_stats=True)
            >>> tuple(stats.shape), int(stats.sum().tokens)
            ((3,), 9)
        """
        return TokenStats(**{f.name: getattr(self, f.name).sum() for f in fields(self)})

    def sum_by(self, index: torch.Tensor, count: int) -> TokenStats:
        """Sums per group: group ``g`` adds the sequences whose ``index`` is ``g``.

        Args:
            index: integer tensor of the fields' shape, each in ``[0, count)``.
            count: the number of groups; the result's fields have shape ``[count]``.

        Example:
            >>> import torch, lossplug
            >>> logits, labels = torch.zeros(3, 4, 5), torch.randint(0, 5, (3, 4))
            >>> _, stats = lossplug.cross_entropy(logits, labels, return_stats=True,
            ...                                   per_sequence_stats=True)
            >>> by_slice = stats.sum_by(torch.tensor([0, 1, 0]), 2)
            >>> by_slice.tokens.tolist()
            [8, 4]
        """
        if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point:
            raise TypeError(f"index must be an integer tensor, got {index!r}")
        if tuple(index.shape) != tuple(self.shape):
            raise ValueError(
                f"index.shape {tuple(index.shape)} must equal the stats' shape {tuple(self.shape)}"
            )
        flat = index.reshape(-1).to(device=self.device, dtype=torch.int64)

        def grouped(value: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(count, dtype=value.dtype, device=value.device)
            return out.index_add_(0, flat, value.reshape(-1))

        return TokenStats(**{f.name: grouped(getattr(self, f.name)) for f in fields(self)})

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


def slice_name(label: Any, where: str, key: str) -> str:
    """``label`` as the name of a slice (the last part of ``key``), or an error naming it.

    A slice is named by a ``str`` or an integer (NumPy's included), non-empty, printable and
    without ``/``, since it becomes the last part of a logged key.

    Example:
        >>> slice_name(3, "slice_by", "val/<metric>/<slice>")
        '3'
    """
    if isinstance(label, bool) or not isinstance(label, (str, numbers.Integral)):
        raise TypeError(f"{where} labels must be str or int, got {label!r}")
    name = str(label)
    if not name or "/" in name or not name.isprintable():
        raise ValueError(
            f"{where} label {label!r} cannot name a slice: it must be non-empty, printable and "
            f"hold no '/' (it becomes the last part of {key})"
        )
    return name
