"""A process of the two-rank gloo run in tests/test_metrics.py (importable by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def make_batches(seed: int = 0, count: int = 5):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        seq = 6 + 3 * i  # uneven batches: different token counts on each rank
        logits = (torch.randn(2, seq, 97, generator=gen) * 3).to(torch.bfloat16)
        target = torch.randint(0, 97, (2, seq), generator=gen)
        target[torch.rand(2, seq, generator=gen) < 0.25] = -100
        batches.append((logits, target))
    return batches


def batch_sources(index: int) -> list[str]:
    """Slice labels of batch ``index``: "a" only in even batches (rank 0), "c" only in odd ones."""
    return ["a", "b"] if index % 2 == 0 else ["c", "b"]


def run(rank: int, world_size: int, port: int, out_path: str) -> None:
    from lossplug.metrics import LanguageModelMetrics, Perplexity

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        perplexity = Perplexity(shift=True)
        everything = LanguageModelMetrics(shift=True)
        sliced = LanguageModelMetrics(shift=True, slices=("a", "b", "c"))
        for index, (logits, target) in enumerate(make_batches()):
            if index % world_size == rank:  # rank 0 sees batches 0, 2, 4; rank 1 sees 1, 3
                perplexity.update(logits, target)
                everything.update(logits, target)
                sliced.update(logits, target, slices=batch_sources(index))
        values = {"perplexity": perplexity.compute(), **everything.compute()}
        sliced_values = sliced.compute()
        local_tokens = perplexity.stats.tokens  # unsynced again after compute
        if rank == 0:
            torch.save(
                {"values": values, "local_tokens": local_tokens, "sliced": sliced_values},
                out_path,
            )
    finally:
        dist.destroy_process_group()
