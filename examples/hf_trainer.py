"""The main job on ``transformers.Trainer``: exact metrics and KPIs through LossplugCallback.

A tiny randomly initialised Llama over the 256 byte values learns Python from the standard
library of the interpreter that runs it, on the CPU in well under a minute:

    pip install "lossplug[hf]"
    python examples/hf_trainer.py

``patch_causal_lm`` makes the model's loss the fused linear cross-entropy (its logits are never
built) and hands its token statistics to ``LossplugCallback``, which adds ``train/perplexity``
and the rest, token-weighted over gradient accumulation, to every Trainer log, ``val/…`` exact
over the eval set and per slice of it (``code``: held-out source files, ``prose``: their
docstrings), and the KPIs (throughput, cost, the share of generated code Python accepts) as
``kpi/<name>``. Everything goes to Weights & Biases, offline unless ``--online`` (no account, no
network needed): the script ends with a table of every metric, how each KPI moved with the
perplexity, and the command that uploads the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Waiting OpenMP threads sleep rather than spin (finetune.py says why). OpenMP reads this once,
# when torch loads; yours wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.utils.data import Dataset

from _python_corpus import PROMPTS, Sliced, Windows, byte_ids, python_tokenizes, stdlib_sources

#: The model: a Llama over the 256 byte values (one token each), its context ``--seq-len`` bytes.
LLAMA_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # 2 query heads share each key/value head
}


class ForTrainer(Dataset):
    """Items named as the model's arguments, which the Trainer keeps; ``Sliced`` items keep the
    slice they come from as ``kind``."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        if isinstance(item, dict):
            return {"input_ids": item["ids"], "kind": item["kind"]}
        return {"input_ids": item}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch as the model takes it; the slice names stay a list of strings (the Trainer's
    default collator drops strings)."""
    ids = torch.stack([item["input_ids"] for item in items])
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids}  # the model shifts the labels
    if "kind" in items[0]:
        batch["kind"] = [item["kind"] for item in items]
    return batch


def sample_bytes(ctx: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Completions sampled from the Trainer's model (``ctx.model``), decoded from bytes; the
    same seeds at every evaluation, so that only the model changes between them. The sampling
    draws from a forked random state: training's own draws go on as if it had not run."""
    outputs = []
    cuda = [ctx.device] if ctx.device is not None and ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for index, prompt in enumerate(prompts):
            torch.manual_seed(index)
            ids = byte_ids(prompt)[None].to(ctx.device)
            out = ctx.model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.8,
                top_k=0,
                pad_token_id=0,
            )
            text = bytes(out[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
            outputs.append(text)
    return outputs


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
    from lossplug.kpi.builtin import GenerationKPI, Throughput, TrainingCost
    from lossplug.loggers import describe_run, read_run
    from lossplug.report import format_table, summarize

    warnings.filterwarnings("ignore", ".*TRANSFORMERS_VERBOSITY.*")
    transformers.set_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=256, max_position_embeddings=args.seq_len, **LLAMA_SIZES
    )
    model = patch_causal_lm(transformers.LlamaForCausalLM(config))  # the fused loss + its stats

    train_text, val_code, val_prose = stdlib_sources(1 << 20)
    rows = args.max_steps * args.batch_size * args.grad_accum
    log_every = max(1, min(10, args.max_steps // 6))
    kpis = [
        Throughput(every_n_steps=log_every),
        TrainingCost(args.price_per_device_hour, currency="USD", every_n_steps=log_every),
        GenerationKPI(  # at each evaluation: the report links it with val/perplexity
            PROMPTS,
            python_tokenizes,
            generate_fn=sample_bytes,
            max_new_tokens=args.seq_len // 2,
            name="code_tokenizes",
            timeout_s=120,
        ),
    ]
    evals = 2 * args.batch_size
    eval_data = Sliced(
        code=Windows(byte_ids(val_code), args.seq_len, evals, args.seed + 1),
        prose=Windows(byte_ids(val_prose), args.seq_len, evals, args.seed + 2),
    )
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
        train_dataset=ForTrainer(Windows(byte_ids(train_text), args.seq_len, rows, args.seed)),
        eval_dataset=ForTrainer(eval_data),
        data_collator=collate,
        callbacks=[LossplugCallback(kpis, slice_by="kind")],
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
