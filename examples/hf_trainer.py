"""The main job on ``transformers.Trainer``: exact metrics and KPIs through LossplugCallback.

A tiny randomly initialised Llama over the 256 byte values learns Python from the standard
library of the interpreter that runs it, on the CPU in well under a minute:

    pip install "lossplug[hf]"
    python examples/hf_trainer.py

``patch_causal_lm`` makes the model's loss the fused linear cross-entropy (its logits are never
built) and hands its token statistics to ``LossplugCallback``, which adds ``train/perplexity``
and the rest, token-weighted over gradient accumulation, to every Trainer log, ``val/…`` exact
over the eval set, and the KPIs (throughput, cost) as ``kpi/<name>``. Everything goes to
Weights & Biases, offline unless ``--online`` (no account, no network needed): the script ends
with a table of every metric and the command that uploads the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset


def python_bytes(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of standard-library source: (training, held-out validation); whole files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, size = [], [], 0
    for index, path in enumerate(sorted(root.glob("*.py"))):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if index % 10 == 0 else train).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not train or not val:
        raise SystemExit(f"found too little Python source under {root}")
    as_ids = lambda chunks: torch.tensor(list(b"\n".join(chunks)), dtype=torch.long)  # noqa: E731
    return as_ids(train), as_ids(val)


class Windows(Dataset):
    """Fixed-length windows at reproducible random offsets, as the Trainer wants them."""

    def __init__(self, ids: torch.Tensor, length: int, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(ids) - length, (count,), generator=gen)
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        window = self.ids[start : start + self.length]
        return {"input_ids": window, "labels": window}  # the model shifts the labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs-hf"), help="checkpoints, W&B run")
    parser.add_argument("--online", action="store_true", help="log to W&B online")
    parser.add_argument("--price-per-device-hour", type=float, default=2.5, help="USD")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.online:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", "lossplug-hf-trainer")
    # Absolute: a W&B service shared with a parent process resolves a relative folder against its
    # own working directory, not this one.
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", str(args.out))
    try:
        import transformers
        import wandb
    except ImportError as exc:
        raise SystemExit(
            f'this example needs the hf extra: pip install "lossplug[hf]" ({exc})'
        ) from exc

    from lossplug.integrations.transformers import LossplugCallback, patch_causal_lm
    from lossplug.kpi.builtin import Throughput, TrainingCost
    from lossplug.loggers import describe_run, read_run
    from lossplug.report import format_table, summarize

    warnings.filterwarnings("ignore", ".*TRANSFORMERS_VERBOSITY.*")
    transformers.set_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
    )
    model = patch_causal_lm(transformers.LlamaForCausalLM(config))  # the fused loss + its stats

    train_ids, val_ids = python_bytes(1 << 20)
    rows = args.max_steps * args.batch_size * args.grad_accum
    log_every = max(1, min(10, args.max_steps // 6))
    kpis = [
        Throughput(every_n_steps=log_every),
        TrainingCost(args.price_per_device_hour, every_n_steps=log_every),
    ]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=str(args.out / "checkpoints"),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr,
            logging_steps=log_every,
            eval_strategy="steps",
            eval_steps=max(1, args.max_steps // 3),
            save_strategy="no",
            report_to="wandb",
            run_name="hf-trainer",
            disable_tqdm=True,
            seed=args.seed,
        ),
        train_dataset=Windows(train_ids, args.seq_len, rows, args.seed),
        eval_dataset=Windows(val_ids, args.seq_len, 4 * args.batch_size, args.seed + 1),
        callbacks=[LossplugCallback(kpis)],
    )
    trainer.train()
    if not trainer.is_world_process_zero():
        return 0
    where = describe_run(wandb.run)
    wandb.finish()
    run = read_run(where.run_dir, wait=60.0)
    print()
    print(format_table(summarize(run), run))
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
