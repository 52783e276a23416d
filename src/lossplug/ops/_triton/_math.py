"""The math of the Triton cross-entropy kernels, written once and shared by all of them.

Every helper works on a tile whose last axis runs over the vocabulary: a ``[BLOCK_V]`` block of
one row (``cross_entropy.py``) or a ``[BLOCK_N, BLOCK_V]`` tile of rows
(``linear_cross_entropy.py``). Per-row values (``run_max``, ``lse``, ``g``, ...) have the tile's
shape without that axis: scalars or ``[BLOCK_N]``. All values are float32.

Online log-sum-exp (forward)
----------------------------
A row's logits ``z_1 .. z_V`` arrive one block at a time. After the blocks seen so far, with
``m`` their maximum, the sweep keeps::

    run_max = m
    run_sum = Σ_j e^(z_j - m)                  (>= 1 for finite logits: the max adds e^0)
    run_ent = Σ_j e^(z_j - m) (z_j - m)
    run_arg = the first j with z_j = m

When a block raises the maximum to ``m' = max(m, max_block z)``, every old term changes by the
same factor: ``e^(z - m') = e^(z - m) e^δ`` with ``δ = m - m' <= 0``, and ``z - m' = (z - m) + δ``.
So the old sums are rescaled, never recomputed::

    run_sum' = e^δ run_sum + Σ_block e^(z - m')
    run_ent' = e^δ (run_ent + δ run_sum) + Σ_block e^(z - m') (z - m')

``δ <= 0`` keeps every exponential in ``(0, 1]``: no overflow whatever the logits. Before the first
block ``run_max = -inf`` and ``run_sum = 0``, where ``δ`` would be ``-inf`` and ``δ run_sum`` NaN;
``δ`` is taken as 0 there (the old sums are empty, any factor works). Masked columns enter as
``-inf``: their exponential is 0, and their ``0 * (z - m') = 0 * -inf`` is replaced by 0. The
argmax moves only when a block's maximum is strictly larger, and ``tl.argmax`` takes the first
maximum of a block, so ``run_arg`` is the first maximum of the row. At the end (``S = run_sum``)::

    lse     = m + log S                                  (log Σ e^z)
    p_j     = e^(z_j - lse) = e^(z_j - m) / S            (softmax)
    entropy = -Σ p_j log p_j = -Σ p_j ((z_j - m) - log S) = log S - run_ent / S

Gradient of a row (backward)
----------------------------
The row's loss, with label smoothing ``ε`` over ``V`` classes and z-loss weight ``λ``::

    L = (1 - ε) (lse - z_y) + ε (lse - (1/V) Σ_j z_j) + λ lse²

With ``∂lse/∂z_j = p_j`` (the softmax) and ``[j = y]`` the one-hot at the target::

    ∂L/∂z_j = (1 - ε) (p_j - [j = y]) + ε (p_j - 1/V) + 2 λ lse p_j
            = p_j (1 + 2 λ lse) - (1 - ε) [j = y] - ε / V

Times the incoming gradient ``g`` of the row's loss, three per-row coefficients remain:
``g (1 + 2 λ lse)`` on the softmax, ``g (1 - ε)`` at the target and ``g ε / V`` everywhere;
``p_j`` is recomputed as ``e^(z_j - lse)`` from the saved ``lse``, so the backward is a single
sweep with no max or sum of its own.

Softcap
-------
``softcap(x) = c tanh(x / c)`` squashes a raw logit ``x`` into ``(-c, c)``; the loss sees the
capped ``z``. By the chain rule ``∂L/∂x = ∂L/∂z (1 - tanh²(x / c)) = ∂L/∂z (1 - (z / c)²)``, so
the backward needs the capped logit alone, not a second ``tanh``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softcap(x, cap):
    """``cap * tanh(x / cap)``, elementwise."""
    # tanh from exp alone (exact to float32 rounding, and interpretable on CPU):
    # tanh|u| = (1 - e^(-2|u|)) / (1 + e^(-2|u|)) with e^(-2|u|) in (0, 1], so it never overflows
    u = x / cap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(u < 0, -t, t)


@triton.jit
def _softcap_grad(grad, z, cap):
    """Chain rule through the softcap: ``grad`` (w.r.t. the capped ``z``) times ``1 - (z/cap)²``."""
    t = z / cap
    return grad * (1.0 - t * t)


@triton.jit
def _lse_update(run_max, run_sum, run_ent, run_arg, z, start):
    """Fold one block of logits into the running max, sum, entropy term and argmax.

    Args:
        run_max, run_sum, run_ent, run_arg: the per-row state (``-inf``, 0, 0, 0 before the
            first block).
        z: the block, masked columns set to ``-inf``; its last axis runs over the vocabulary.
        start: the vocabulary index of the block's first column (for the argmax).

    Returns:
        The new ``(run_max, run_sum, run_ent, run_arg)``.
    """
    block_max = tl.max(z, axis=-1)
    block_arg = tl.argmax(z, axis=-1).to(tl.int64) + start
    new_max = tl.maximum(run_max, block_max)
    run_arg = tl.where(block_max > run_max, block_arg, run_arg)
    # 0 on the first block (run_max = -inf), where the rescale would be 0 * -inf
    delta = tl.where(run_sum > 0, run_max - new_max, 0.0)
    scale = tl.exp(delta)
    shifted = z - tl.expand_dims(new_max, -1)
    e = tl.exp(shifted)
    ez = e * tl.where(e > 0, shifted, 0.0)  # masked columns: 0, not 0 * -inf
    run_ent = scale * (run_ent + run_sum * delta) + tl.sum(ez, axis=-1)
    run_sum = run_sum * scale + tl.sum(e, axis=-1)
    return new_max, run_sum, run_ent, run_arg


@triton.jit
def _lse_entropy(run_max, run_sum, run_ent):
    """The row's log-sum-exp and softmax entropy from the final state of :func:`_lse_update`."""
    log_sum = tl.log(run_sum)
    return run_max + log_sum, log_sum - run_ent / run_sum


@triton.jit
def _row_grad(
    z, cols, y, lse, g, label_smoothing, z_loss, vocab, softcap, HAS_SOFTCAP: tl.constexpr
):
    """``g * ∂L/∂x`` for a tile of logits: softmax, one-hot, smoothing and z-loss terms, softcap.

    Args:
        z: the (capped) logits; the last axis runs over the vocabulary.
        cols: the vocabulary indices of ``z``'s last axis.
        y: the row's target.
        lse: the row's log-sum-exp of ``z`` (saved by the forward).
        g: the incoming gradient of the row's loss.
        label_smoothing, z_loss, vocab, softcap: the loss's options (``softcap`` read only
            when ``HAS_SOFTCAP``).
    """
    # p (1 + 2 λ lse) - ε/V, then - (1 - ε) at the target. ptxas allocates registers by this op
    # order: computing the three coefficients first cost up to 18 more in some sm_90 backwards.
    prob_scale = g * (1.0 + 2.0 * z_loss * lse)
    grad = tl.exp(z - tl.expand_dims(lse, -1)) * tl.expand_dims(prob_scale, -1)
    grad = grad - tl.expand_dims(g * label_smoothing / vocab, -1)
    is_target = cols == tl.expand_dims(y, -1)
    grad = tl.where(is_target, grad - tl.expand_dims(g * (1.0 - label_smoothing), -1), grad)
    if HAS_SOFTCAP:
        grad = _softcap_grad(grad, z, softcap)
    return grad
