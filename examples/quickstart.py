"""A first look at lossplug: train a tiny byte-level language model with the fused loss.

Each step computes the training loss and the token statistics (perplexity, accuracy, entropy) in
one pass over the logits, without copying them for the causal shift. Runs on the CPU in seconds:

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from torch import nn

import lossplug


def corpus_bytes() -> torch.Tensor:
    """Python source that ships with every interpreter: real text, no download."""
    text = "".join(inspect.getsource(module) for module in (argparse, inspect))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class TinyLM(nn.Module):
    """Embedding, a GRU and an output head over the 256 byte values."""

    def __init__(self, vocab: int = 256, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = corpus_bytes()
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = lossplug.TokenStats.zeros()
    start = time.perf_counter()
    print(f"{'step':>5} {'loss':>8} {'perplexity':>11} {'accuracy':>9} {'entropy':>8}")
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(data) - args.seq, (args.batch,))
        tokens = torch.stack([data[o : o + args.seq] for o in offsets])
        logits = model(tokens)
        loss, stats = lossplug.cross_entropy(logits, tokens, shift=True, return_stats=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window = window + stats  # exact aggregate: sums, not a mean of per-batch values
        if step % 10 == 0 or step == args.steps:
            print(
                f"{step:>5} {loss.item():>8.4f} {window.perplexity.item():>11.3f} "
                f"{window.accuracy.item():>9.3f} {window.entropy.item():>8.3f}"
            )
            window = lossplug.TokenStats.zeros()
    seconds = time.perf_counter() - start
    print(f"{args.steps} steps in {seconds:.1f} s; perplexity is over the last logging window")


if __name__ == "__main__":
    main()
