"""Cost model of the fused ops at the DESIGN shapes: bytes, FLOPs, atomics and their floors.

No GPU needed: the counts follow from the shapes and from the launch code's own tiles
(``launch_params`` of the Triton ops, the chunk size of the PyTorch path), and the floors from
the cards' datasheet peaks. A floor is the time the traffic (or the arithmetic) alone would take
at peak; a real kernel is slower. ``python benchmarks/cost_model.py`` prints the Markdown table
kept in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

os.environ.setdefault("TRITON_INTERPRET", "0")  # the GPU's launch parameters, not the interpreter's

N, D, V = 8192, 4096, 128256  # DESIGN: CE [N, V]; linear CE N tokens, D hidden, V vocabulary
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Card:
    name: str
    bandwidth: float  # bytes/s of HBM
    bf16_flops: float  # dense tensor-core FLOP/s


H100 = Card("H100 SXM", 3.35e12, 989e12)
A100 = Card("A100 SXM 80GB", 2.039e12, 312e12)

# DESIGN's targets, in ms on an H100 (Performance targets table)
TARGETS_MS = {
    "ce_fwd_bwd": 1.3 * 1.40,
    "ce_forward": 1.2 * 0.70,
    "lce_fwd_bwd": 1.4 * 32.0,
}


@dataclass(frozen=True)
class Cost:
    """What one call moves and computes; ``overlap``: can the memory and math run together."""

    op: str
    design: str
    bytes: float
    flops: float
    atomics: float = 0.0
    overlap: bool = True
    target: str = ""

    def floor_ms(self, card: Card) -> float:
        memory = self.bytes / card.bandwidth
        math_ = self.flops / card.bf16_flops
        return 1e3 * (max(memory, math_) if self.overlap else memory + math_)


def _lce_tiles() -> dict:
    from lossplug.ops._triton import linear_cross_entropy as lce

    return lce.launch_params(interpreted=False)


def atomics_per_call(n: int = N, d: int = D, v: int = V) -> tuple[int, int]:
    """fp32 atomic adds of today's Triton backward: every (token block, vocab block) tile adds
    its ``[BLOCK_N, D]`` part of the hidden gradient and ``[BLOCK_V, D]`` of the weight's."""
    tiles = _lce_tiles()
    blocks_n, blocks_v = math.ceil(n / tiles["BLOCK_N"]), math.ceil(v / tiles["BLOCK_V"])
    return blocks_n * blocks_v * tiles["BLOCK_N"] * d, blocks_n * blocks_v * tiles["BLOCK_V"] * d


def costs() -> list[Cost]:
    """One row per op and design at the DESIGN shapes (bf16 inputs)."""
    torch_lce = importlib.import_module("lossplug.ops._torch.linear_cross_entropy")
    logits = N * V * BF16
    ce_flops = 12 * N * V  # softmax, entropy, argmax and gradient: ~a dozen FLOPs a logit
    rows = [
        Cost("CE fwd+bwd", "today: fwd reads logits, bwd reads them again, writes the grad",
             3 * logits, ce_flops, target="ce_fwd_bwd"),
        # the forward's second sweep over a row re-reads it from L2 (a row is 250 KB; the rows in
        # flight on 132 SMs fit the 50 MB L2), so HBM sees one read and one write
        Cost("CE fwd+bwd", "grad written in the forward (scalar loss): 1 read + 1 write",
             2 * logits, ce_flops, target="ce_fwd_bwd"),
        # an incoming gradient other than 1 (gradient accumulation's 1/k, fp16 loss scaling) is
        # known only in the backward, which must then read and write the whole gradient again
        Cost("CE fwd+bwd", "grad written in the forward, incoming grad != 1: + a scale pass",
             4 * logits, ce_flops, target="ce_fwd_bwd"),
        Cost("CE forward-only", "today: 1 read of the logits", logits, ce_flops / 2,
             target="ce_forward"),
    ]  # fmt: skip
    matmul = 2 * N * D * V
    weights = V * D * BF16
    grad_h, grad_w = atomics_per_call()
    # each fp32 atomic is a read and a write of 4 bytes; the fp32 gradients (134 MB and 2.1 GB)
    # do not fit a 50 MB L2, so the traffic reaches HBM
    atomic_bytes = 2 * FP32 * (grad_h + grad_w)
    rows.append(Cost(
        "linear CE fwd+bwd", "today's Triton: 4 matmuls (logits recomputed), fp32 atomics",
        atomic_bytes + 2 * weights, 4 * matmul, atomics=grad_h + grad_w, target="lce_fwd_bwd",
    ))  # fmt: skip
    chunk = torch_lce._rows_per_chunk(V, N)
    chunks = math.ceil(N / chunk)
    workspace = chunk * V * FP32
    # per chunk: the fp32 logits workspace filled from the bf16 product, ~4 passes of scoring,
    # copied back to bf16; the fp32 weight gradient read and written with its bf16 slice added
    per_chunk = 6 * workspace + V * D * (FP32 + FP32 + BF16)
    rows.append(Cost(
        "linear CE fwd+bwd", f"torch chunked ({chunk} rows): 3 cuBLAS matmuls + elementwise",
        chunks * per_chunk, 3 * matmul, overlap=False,
        target="lce_fwd_bwd",
    ))  # fmt: skip
    rows.append(Cost(
        "linear CE fwd+bwd", "torch chunked, dW accumulated in fp32 by the GEMM itself",
        chunks * 6 * workspace, 3 * matmul, overlap=False,
        target="lce_fwd_bwd",
    ))  # fmt: skip
    return rows


def markdown() -> str:
    lines = [
        f"Shapes: CE [{N}, {V}] bf16; linear CE N={N}, D={D}, V={V} bf16. "
        f"H100: {H100.bandwidth / 1e12:.2f} TB/s, {H100.bf16_flops / 1e12:.0f} TFLOP/s; "
        f"A100: {A100.bandwidth / 1e12:.3f} TB/s, {A100.bf16_flops / 1e12:.0f} TFLOP/s. "
        "Floor = max(bytes/bandwidth, FLOPs/peak), or their sum for the PyTorch path, whose "
        "matmuls and elementwise passes are separate kernels (its bytes are the elementwise "
        "ones: the GEMMs' operand reads hide under their math).",
        "",
        "| op | design | GB moved | TFLOP | fp32 atomics | floor H100 ms | floor A100 ms "
        "| DESIGN target H100 ms | floor / target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in costs():
        target = TARGETS_MS[c.target]
        h100 = c.floor_ms(H100)
        atomics = f"{c.atomics:.3g}" if c.atomics else "0"
        lines.append(
            f"| {c.op} | {c.design} | {c.bytes / 1e9:.2f} | {c.flops / 1e12:.3g} | {atomics} "
            f"| {h100:.2f} | {c.floor_ms(A100):.2f} | {target:.2f} | {h100 / target:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
