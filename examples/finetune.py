"""The main job: fine-tune a small causal language model with Lightning and lossplug.

Model-centric metrics (exact cross-entropy, perplexity, token accuracy, entropy) and
business-centric KPIs (throughput, cost, the share of generated code Python accepts) are logged
side by side to Weights & Biases: offline when you are not logged in (no account, no network),
online otherwise. By default a small GPT over bytes learns Python from the standard library of
the interpreter that runs it, on the CPU in about a minute:

    python examples/finetune.py

Validation is split in two slices, ``code`` (held-out source files) and ``prose`` (their
docstrings alone), logged as ``val/perplexity/code`` and ``val/perplexity/prose`` beside the
overall ``val/perplexity``. At the end it prints a table of every metric (first, last, best and at
which step), how each KPI moved with the perplexity, the run folder with the command that uploads
it, and the two commands that train a second run and compare both; and it writes a plot of
perplexity and the KPIs.
``--hf-model PATH`` fine-tunes a local Hugging Face causal LM (``pip install transformers``); a
supported family trains through ``patch_causal_lm``, which never builds its logits.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

# Torch's OpenMP threads spin while they wait for the next parallel region. When other processes
# load the cores (DataLoader workers, a second run, a neighbour on a shared machine), a spinning
# thread holds a core that a descheduled one needs, and each of the small model's thousands of
# parallel regions waits for the slowest: on 2 cores beside two busy processes, 80 steps took 77 s
# instead of 25 s waiting passively. OpenMP reads this once, when torch loads; yours wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader

import lossplug
from _python_corpus import (
    PROMPTS,
    Sliced,
    Windows,
    byte_ids,
    python_tokenizes,
    stdlib_sources,
)
from lossplug.integrations.transformers import is_patched, patch_causal_lm
from lossplug.kpi.builtin import GenerationKPI, Throughput, TrainingCost
from lossplug.loggers import describe_run, read_run, wandb_logger


# ---------------------------------------------------------------------------------------- model
class ByteGPT(nn.Module):
    """A small decoder-only transformer over the 256 byte values."""

    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(256, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))

    @torch.no_grad()
    def complete(self, prompt: str, new_bytes: int, gen: torch.Generator, temperature=0.8) -> str:
        device = self.head.weight.device
        ids = torch.tensor([list(prompt.encode())], device=device)
        for _ in range(new_bytes):
            logits = self(ids[:, -self.context :])[0, -1].float() / temperature
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
            ids = torch.cat([ids, nxt[None]], dim=1)
        return bytes(ids[0, len(prompt.encode()) :].tolist()).decode("utf-8", errors="replace")


class CausalLMFineTune(L.LightningModule):
    """Training and validation with the fused loss; the statistics go to LossMonitor for free."""

    def __init__(self, model: nn.Module, lr: float, max_steps: int, hf: bool) -> None:
        super().__init__()
        self.model, self.lr, self.max_steps, self.hf = model, lr, max_steps, hf

    def _step(self, ids: torch.Tensor) -> tuple[torch.Tensor, lossplug.TokenStats]:
        if self.hf and is_patched(self.model):
            # the fused linear loss: no [batch, seq, vocab] logits, the statistics come along
            # (LossMonitor takes their per-sequence form from the patched model for the slices)
            out = self.model(input_ids=ids, labels=ids)
            return out.loss, out.token_stats
        logits = self.model(input_ids=ids).logits if self.hf else self.model(ids)
        # shift=True: position t is scored against token t + 1 without copying the logits;
        # one sum per sequence, so that LossMonitor(slice_by=...) can split them by slice
        return lossplug.cross_entropy(
            logits, ids, shift=True, return_stats=True, per_sequence_stats=True
        )

    def training_step(self, ids, batch_idx):
        loss, stats = self._step(ids)
        return {"loss": loss, "stats": stats}

    def validation_step(self, batch, batch_idx):
        loss, stats = self._step(batch["ids"])
        return {"loss": loss, "stats": stats}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        warmup = max(1, self.max_steps // 20)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, self.max_steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, auto…")
    parser.add_argument("--devices", default="1", help="number of devices (DDP when > 1)")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed, 16-mixed, 32")
    parser.add_argument("--hf-model", type=Path, default=None, help="a local HF causal LM")
    parser.add_argument("--corpus-mb", type=float, default=2.0)
    parser.add_argument("--price-per-device-hour", type=float, default=2.5, help="USD")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="logs and the plot")
    parser.add_argument("--project", default="lossplug-finetune")
    parser.add_argument("--offline", action="store_true", help="never go online")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    return args


def build(args: argparse.Namespace):
    """Model, tokenizer-free byte ids or HF token ids (training text, validation code and
    validation prose), and the code KPI."""
    train_text, val_text, val_prose = stdlib_sources(int(args.corpus_mb * 2**20))
    if args.hf_model is None:
        model = ByteGPT(width=96, layers=3, heads=4, context=args.seq_len)
        encode = byte_ids
        gen = torch.Generator().manual_seed(args.seed)

        def generate(ctx, prompts, max_new_tokens):
            return [ctx.model.model.complete(p, max_new_tokens, gen) for p in prompts]

        code_kpi = GenerationKPI(
            PROMPTS,
            python_tokenizes,
            generate_fn=generate,
            max_new_tokens=48,
            name="code_tokenizes",
            timeout_s=120,
            target=0.75,  # the report gives the perplexity at which it was first met
        )
        return model, encode(train_text), (encode(val_text), encode(val_prose)), code_kpi, False
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise SystemExit("--hf-model needs transformers: pip install transformers") from exc
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model)
    model = AutoModelForCausalLM.from_pretrained(args.hf_model)
    try:
        patch_causal_lm(model)
    except (TypeError, ValueError) as exc:  # another family: the loss runs on its logits
        print(f"training on the model's logits ({exc})")

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    code_kpi = GenerationKPI(
        PROMPTS,
        python_tokenizes,
        tokenizer=tokenizer,
        max_new_tokens=32,
        name="code_tokenizes",
        timeout_s=120,
        target=0.75,
    )
    val_ids = (encode(val_text[:100_000]), encode(val_prose[:100_000]))
    return model, encode(train_text[:400_000]), val_ids, code_kpi, True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    model, train_ids, val_ids, code_kpi, hf = build(args)
    train = Windows(train_ids, args.seq_len, args.max_steps * args.batch_size, args.seed)
    val = Sliced(
        code=Windows(val_ids[0], args.seq_len, 4 * args.batch_size, args.seed + 1),
        prose=Windows(val_ids[1], args.seq_len, 4 * args.batch_size, args.seed + 2),
    )
    log_every = max(1, min(10, args.max_steps // 10))
    val_every = max(1, args.max_steps // 4)  # at least twice in any run of 30 steps or more

    args.out.mkdir(parents=True, exist_ok=True)
    logger = wandb_logger(
        args.project,
        save_dir=args.out,
        offline=True if args.offline else None,
        config=vars(args) | {"out": str(args.out), "hf_model": str(args.hf_model)},
    )
    kpis = [
        Throughput(every_n_steps=log_every),
        TrainingCost(args.price_per_device_hour, currency="USD", every_n_steps=log_every),
        code_kpi,
    ]
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=devices,
        precision=args.precision,
        logger=logger,
        callbacks=[
            lossplug.LossMonitor(log_every_n_steps=log_every, slice_by="kind"),
            lossplug.KPIMonitor(kpis),
        ],
        log_every_n_steps=log_every,
        val_check_interval=val_every,
        limit_val_batches=8,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    module = CausalLMFineTune(model, args.lr, args.max_steps, hf)
    trainer.fit(
        module,
        DataLoader(train, batch_size=args.batch_size, shuffle=False),
        DataLoader(val, batch_size=args.batch_size),
    )
    if not trainer.is_global_zero:
        return 0
    seconds = time.perf_counter() - started
    from lossplug.report import format_table, plot_run, summarize

    where = describe_run(logger)
    logger.experiment.finish()
    run = read_run(where.run_dir, wait=60.0)
    print()
    print(format_table(summarize(run), run))
    plot = plot_run(run, args.out / "finetune.png")
    print(f"\ntrained {trainer.global_step} steps in {seconds:.0f} s")
    print(f"plot: {plot}")
    print(where)
    other_lr = f"{args.lr / 3:g}"
    other_out = args.out.with_name(f"{args.out.name}-lr{other_lr}")
    print(
        "compare with a second run:\n"
        f"  python examples/finetune.py --lr {other_lr} --out {other_out}\n"
        f"  lossplug report {args.out} {other_out} --plot compare.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
