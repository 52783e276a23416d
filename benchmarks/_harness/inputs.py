"""Inputs of the benchmarks and their float64 reference: random logits, linear cross-entropy
operands, and the perplexity and gradient error of a call against the tests' own float64
reference (``tests/_reference.py``)."""

from __future__ import annotations

import os
import sys

import torch

# the float64 references live with the tests (tests/_reference.py); the benchmarks import them
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TESTS = os.path.join(_ROOT, "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

import _reference  # noqa: E402

IGNORE = _reference.IGNORE
MiB = _reference.MiB


def fill_logits(
    logits: torch.Tensor,
    true_token: torch.Tensor,
    gen: torch.Generator,
    bump: float = 14.0,
    block_bytes: int = 8 * MiB,
) -> None:
    """Fill ``logits [..., V]`` with ``2·randn`` plus a random bump in ``[0, bump)`` on each
    row's ``true_token``, ``block_bytes`` of float32 rows at a time (the high-water mark stays
    flat), on the logits' device.

    The bump puts the true class often near the top, as with a trained model: the perplexity is
    a plausible ~10-1000 instead of ~V.
    """
    vocab, device = logits.shape[-1], logits.device
    flat, flat_true = logits.view(-1, vocab), true_token.reshape(-1)
    rows = max(1, block_bytes // (4 * vocab))
    for start in range(0, flat.shape[0], rows):
        stop = min(start + rows, flat.shape[0])
        z = torch.randn(stop - start, vocab, device=device, generator=gen).mul_(2.0)
        lift = torch.rand(stop - start, device=device, generator=gen).mul_(bump)
        z[torch.arange(stop - start, device=device), flat_true[start:stop]] += lift
        flat[start:stop].copy_(z)


def linear_inputs(
    rows: int,
    dim: int,
    vocab: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    block_bytes: int = 8 * MiB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [rows, dim]``, ``weight [vocab, dim]`` and targets ``[rows]`` (none ignored),
    built ``block_bytes`` of float32 rows at a time on the generator's device.

    ``weight`` is ``2 randn / sqrt(dim)`` (logits of standard deviation about 2); each hidden row
    is ``randn`` plus a random multiple in ``[0, 14)`` of ``weight[y] / |weight[y]|²``, which
    lifts the logit of its target by that much, so the loss is a plausible ~5-6 nats instead of
    ``log V``, as with a trained model.
    """
    device = gen.device
    step = max(1, block_bytes // (4 * dim))
    weight = torch.empty(vocab, dim, device=device, dtype=dtype)
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        w = torch.randn(stop - start, dim, device=device, generator=gen)
        weight[start:stop].copy_(w.mul_(2.0 / dim**0.5))
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    hidden = torch.empty(rows, dim, device=device, dtype=dtype)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w_true = weight.index_select(0, target[start:stop]).float()  # the rounded values
        bump = torch.rand(stop - start, device=device, generator=gen).mul_(14.0)
        h = torch.randn(stop - start, dim, device=device, generator=gen)
        h.addcmul_(w_true, (bump / w_true.square().sum(dim=1))[:, None])
        hidden[start:stop].copy_(h)
    return hidden, weight, target


def reference(
    logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None = None
) -> tuple[float, float | None]:
    """Float64 perplexity of ``logits`` against per-row ``target`` and the gradient error.

    Computed from the very values given (bf16 logits are compared with their own rounded
    values), a few rows at a time so the float64 copy never exists whole
    (:func:`_reference.reference_cross_entropy_rows`, the tests' reference). The gradient error
    is ``max |grad - grad_ref| / max |grad_ref|`` of the mean loss (``None`` without ``grad``).
    """
    ref = _reference.reference_cross_entropy_rows(
        logits, target, grad, block_bytes=16 * MiB, stats=False
    )
    ppl = float(torch.tensor(ref["loss"], dtype=torch.float64).exp())
    if grad is None:
        return ppl, None
    return ppl, ref["grad_max_abs_err"] / ref["grad_max_ref"]
