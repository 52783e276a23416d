"""A tiny causal language model and data for Trainer tests, in both Lightning namespaces.

Module-level classes so that spawned DDP processes can import them by name.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lossplug

VOCAB = 50

#: What every Trainer of the tests shares: CPU, and no progress bar, model summary, checkpoints or
#: sanity check, unless a test asks for them.
QUIET_TRAINER = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
    num_sanity_val_steps=0,
)


#: What every ``transformers.Trainer`` of the tests shares: CPU, evaluation every ``eval_steps``,
#: seed 0, and no checkpoints, reporting, progress bar or data-loading processes.
QUIET_TRAINING_ARGS = dict(
    per_device_train_batch_size=2,
    per_device_eval_batch_size=3,
    logging_steps=2,
    eval_strategy="steps",
    save_strategy="no",
    learning_rate=5e-3,
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
)


def tiny_sizes(hidden: int = 16, intermediate: int = 32, layers: int = 1, heads: int = 2, **more):
    """Keyword arguments of a Hugging Face config for a transformer small enough for CPU tests:
    its four sizes under the names most configs give them, then ``more`` as given."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        **more,
    )


#: A Hugging Face decoder small enough for CPU tests: ``LlamaConfig(vocab_size=V, **TINY_DECODER)``.
TINY_DECODER = tiny_sizes(num_key_value_heads=1, max_position_embeddings=32)


def quiet_trainer(tmp_path, logger, callbacks, *, lightning=L, **overrides):
    """A ``lightning.Trainer`` with :data:`QUIET_TRAINER` settings on one CPU process."""
    settings = dict(
        QUIET_TRAINER, default_root_dir=tmp_path, devices=1, logger=logger, callbacks=callbacks
    )
    settings.update(overrides)
    return lightning.Trainer(**settings)


def logged_at(recorder, step: int) -> dict[str, float]:
    """Everything a ``Recorder`` got at ``step`` (a step may get several log calls)."""
    merged: dict[str, float] = {}
    for logged_step, metrics in recorder.rows:
        if logged_step == step:
            merged.update(metrics)
    return merged


def make_tokens(n_rows: int, seq: int, *, seed: int, ignore_share: float = 0.2) -> torch.Tensor:
    """Rows of ``[inputs | labels]``: labels are the inputs with some positions ignored."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n_rows, seq), generator=gen)
    labels = tokens.clone()
    labels[torch.rand(n_rows, seq, generator=gen) < ignore_share] = -100
    return torch.cat([tokens, labels], dim=1)


def make_loader(n_batches: int, batch_size: int = 4, seq: int = 12, *, seed: int = 0, **kw):
    rows = make_tokens(n_batches * batch_size, seq, seed=seed, **kw)
    return DataLoader(TensorDataset(rows), batch_size=batch_size, shuffle=False)


class _TinyLMMixin:
    """Embedding + linear head (a bigram model): fast, and it learns."""

    def __init__(self, mode: str = "stats", lr: float = 0.05, record: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.mode = mode
        self.lr = lr
        self.record = record
        self.seen: dict[str, list] = {"train": [], "val": []}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))

    def _step(self, batch, stage: str):
        (rows,) = (batch["rows"],) if isinstance(batch, dict) else batch
        seq = rows.shape[1] // 2
        tokens, labels = rows[:, :seq], rows[:, seq:]
        logits = self(tokens)
        if self.record:
            self.seen[stage].append((logits.detach().double().clone(), labels.clone()))
        per_sequence = self.mode == "sequence_stats"
        loss, stats = lossplug.cross_entropy(
            logits, labels, shift=True, return_stats=True, per_sequence_stats=per_sequence
        )
        if self.mode in ("stats", "sequence_stats"):
            return {"loss": loss, "stats": stats}
        if self.mode == "logits":
            return {"loss": loss, "logits": logits, "labels": labels}
        if self.mode == "custom":
            return {"loss": loss, "my_logits": logits, "my_labels": labels}
        return loss  # "none": nothing LossMonitor can use

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        out = self._step(batch, "val")
        return out if isinstance(out, dict) else None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyLM(_TinyLMMixin, L.LightningModule):
    pass


class TinyLMPL(_TinyLMMixin, pl.LightningModule):
    pass


class _RecorderMixin:
    """A logger that keeps every ``log_metrics`` call: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


class Recorder(_RecorderMixin, L.loggers.Logger):
    pass


class RecorderPL(_RecorderMixin, pl.loggers.Logger):
    pass


NAMESPACES = {
    "lightning.pytorch": (L, TinyLM, Recorder),
    "pytorch_lightning": (pl, TinyLMPL, RecorderPL),
}


class InOrderShards(L.LightningDataModule):
    """Rank r reads rows r, r + W, r + 2W, … in order, so step s of a W-rank run covers the same
    rows as step s of one process with a W times larger batch (Lightning's own distributed
    sampler shuffles training data)."""

    def __init__(self, n_rows: int, batch_size: int, seq: int = 12) -> None:
        super().__init__()
        self.rows = make_tokens(n_rows, seq, seed=0)
        self.batch_size = batch_size

    def train_dataloader(self):
        from torch.utils.data.distributed import DistributedSampler

        dataset = TensorDataset(self.rows)
        sampler = (
            DistributedSampler(dataset, shuffle=False) if self.trainer.world_size > 1 else None
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def record_rank_kpi(ctx, path: str) -> float:
    """A KPI that notes which rank ran it (for the DDP test) and returns a falling score."""
    with open(path, "a") as handle:
        handle.write(f"{ctx.trainer.global_rank} {ctx.step}\n")
    return 100.0 - ctx.step


class CloseProcessGroup(L.Callback):
    """For ``strategy="ddp_spawn"``: spawned workers exit without running ``atexit``, where
    Lightning would close the gloo process group, and a worker that exits with gloo's threads
    alive sometimes aborts ("terminate called without an active exception"). Close it once the
    run is over."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class InOrderShardsWithVal(InOrderShards):
    """The same, plus one validation batch."""

    def val_dataloader(self):
        return make_loader(1, seed=5)


def sliced_batches(sources_per_batch, *, batch_size: int = 3, seq: int = 10, seed: int = 7):
    """Dict batches ``{"rows", "source", "task"}``: each batch's sequences cycle through its
    list of source names; ``task`` is an int label (the source's length)."""
    batches = []
    for index, sources in enumerate(sources_per_batch):
        rows = make_tokens(batch_size, seq, seed=seed + index)
        names = [sources[i % len(sources)] for i in range(batch_size)]
        batches.append(
            {"rows": rows, "source": names, "task": torch.tensor([len(n) for n in names])}
        )
    return batches


class SlicedShards(InOrderShards):
    """Training rows as ``InOrderShards``; validation batches of named slices, a different list
    per rank (``val_by_rank[r]``), or all of them in order on one process."""

    def __init__(self, n_rows: int, batch_size: int, val_by_rank) -> None:
        super().__init__(n_rows, batch_size)
        self.val_by_rank = val_by_rank

    def val_dataloader(self):
        if self.trainer.world_size > 1:
            rank = self.trainer.global_rank
            before = sum(len(lists) for lists in self.val_by_rank[:rank])
            batches = sliced_batches(self.val_by_rank[rank], seed=7 + before)
        else:
            batches = sliced_batches([s for rank in self.val_by_rank for s in rank])
        return DataLoader(batches, batch_size=None)
