"""The monitoring core under both trainers: what a KPI's model calls, evaluations and KPI time
do to the training numbers, the end-of-fit totals, two monitors side by side, and the warnings
for numbers that cannot be right."""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lossplug
from _tiny_lm import Recorder, TinyLM, make_loader, quiet_trainer
from lossplug.kpi import KPI
from lossplug.kpi.builtin import Throughput, TrainingCost
from lossplug.monitoring.clock import TrainingClock

transformers = pytest.importorskip("transformers")
from lossplug.integrations.transformers import LossplugCallback, patch_causal_lm  # noqa: E402
from test_hf_trainer_callback import make_trainer, rows, rows_with, tiny_llama  # noqa: E402

HELD_OUT = rows(50, seed=9)  # the rows a scoring KPI reads: many more tokens than a step's


def score_held_out(model) -> float:
    """A KPI that scores held-out rows with the (patched) model: a call with labels."""
    ids = torch.stack([row["input_ids"] for row in HELD_OUT])
    labels = torch.stack([row["labels"] for row in HELD_OUT])
    return float(model(input_ids=ids, labels=labels).loss)


class PatchedLlamaModule(L.LightningModule):
    """A Lightning module around a patched Hugging Face model that returns only the loss."""

    def __init__(self):
        super().__init__()
        self.model = patch_causal_lm(tiny_llama())

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def llama_loader(n_rows: int = 8, batch_size: int = 2):
    data = rows(n_rows, seed=1)
    ids = torch.stack([row["input_ids"] for row in data])
    labels = torch.stack([row["labels"] for row in data])
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size)


# ------------------------------------------------------------- a KPI's model calls are not counted
@pytest.mark.parametrize("kpi_first", [True, False])
def test_a_kpis_call_with_labels_is_never_counted_as_training_lightning(kpi_first, tmp_path):
    scorer = KPI("held_out", lambda ctx: score_held_out(ctx.model.model), every_n_steps=1)
    callbacks = [lossplug.KPIMonitor([scorer]), lossplug.LossMonitor(log_every_n_steps=1)]
    if not kpi_first:
        callbacks.reverse()
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, recorder, callbacks, max_steps=4)
    trainer.fit(PatchedLlamaModule(), llama_loader())
    # 2 rows of SEQ - PROMPT scored tokens per step: the KPI's 50 rows are not training data
    tokens_per_step = 2 * 9
    assert recorder.series("train/tokens") == [
        (s, float(s * tokens_per_step)) for s in (1, 2, 3, 4)
    ]
    assert len(recorder.series("kpi/held_out")) == 4


def test_a_kpis_call_with_labels_is_never_counted_as_training_transformers(tmp_path):
    seen = []

    def scorer(ctx):
        seen.append(ctx.step)
        return score_held_out(ctx.model)

    callback = LossplugCallback([KPI("held_out", scorer, every_n_steps=1)])
    trainer = make_trainer(tmp_path, callback, max_steps=4, eval_strategy="no")
    trainer.train()
    tokens = [row["train/tokens"] for row in rows_with(trainer.state.log_history, "train/tokens")]
    # 2 rows × 2 micro-batches × 9 tokens per optimizer step; a KPI's step is a logging step
    assert tokens == [36.0, 72.0, 108.0, 144.0]
    assert seen == [1, 2, 3, 4]


# ------------------------------------------------------------------------- training time only
class SlowValidation(TinyLM):
    def validation_step(self, batch, batch_idx):
        time.sleep(0.25)
        return super().validation_step(batch, batch_idx)


def test_tokens_per_sec_does_not_dip_at_a_validation_step(tmp_path):
    recorder = Recorder()
    speed = Throughput(every_n_steps=2)
    callbacks = [
        lossplug.LossMonitor(log_every_n_steps=2),
        lossplug.KPIMonitor([speed, KPI("slow", lambda ctx: time.sleep(0.3), every_n_steps=2)]),
    ]
    trainer = quiet_trainer(
        tmp_path, recorder, callbacks, max_steps=12, val_check_interval=4, limit_val_batches=2
    )
    trainer.fit(SlowValidation(), make_loader(12), make_loader(2, seed=3))
    tokens = dict(recorder.series("train/tokens"))
    # the windows (4, 6] and (8, 10] hold a validation (0.5 s of sleep) and a KPI call (0.3 s):
    # counted, the seconds each rate divides by would be over 0.8 s; a window of two steps of
    # this model trains in milliseconds
    for key in ("train/tokens_per_sec", "kpi/throughput/tokens_per_sec"):
        rates = dict(recorder.series(key))
        for step in (6, 10):
            seconds = (tokens[step] - tokens[step - 2]) / rates[step]
            assert seconds < 0.4, (key, step, seconds)


class FailingValidation(TinyLM):
    def validation_step(self, batch, batch_idx):
        raise RuntimeError("a validation that fails")


def test_a_validation_that_failed_in_an_earlier_fit_does_not_stop_the_clock(tmp_path):
    failing = quiet_trainer(
        tmp_path, Recorder(), [lossplug.LossMonitor(), lossplug.KPIMonitor([])], max_steps=4
    )
    with pytest.raises(RuntimeError, match="a validation that fails"):
        failing.fit(FailingValidation(), make_loader(4), make_loader(1, seed=3))
    recorder = Recorder()
    callbacks = [lossplug.LossMonitor(log_every_n_steps=2)]
    trainer = quiet_trainer(tmp_path, recorder, callbacks, max_steps=4, limit_val_batches=0)
    trainer.fit(TinyLM(), make_loader(4))
    # a stopped clock would divide by nothing (a rate of about 1e10 tokens per second)
    rates = [rate for _, rate in recorder.series("train/tokens_per_sec")]
    assert len(rates) == 2 and all(0 < rate < 1e7 for rate in rates), rates


def test_the_training_clock_leaves_out_paused_time_once():
    clock = TrainingClock()
    start = clock.now()
    clock.pause("validation")
    clock.pause("another callback")  # two callbacks see one validation
    time.sleep(0.05)
    clock.resume("validation")
    time.sleep(0.05)
    clock.resume("another callback")
    clock.resume("never paused")
    assert clock.now() - start < 0.02
    time.sleep(0.03)
    assert clock.now() - start >= 0.03
    clock.pause("a run that failed")
    clock.release_all()  # the next run starts
    before = clock.now()
    time.sleep(0.03)
    assert clock.now() - before >= 0.03


def test_transformers_logs_tokens_per_sec_over_training_time(tmp_path):
    callback = LossplugCallback([KPI("slow", lambda ctx: time.sleep(0.3), every_n_steps=2)])
    trainer = make_trainer(tmp_path, callback, max_steps=6, eval_strategy="no")
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logged = rows_with(trainer.state.log_history, "train/tokens_per_sec")
    assert [row["step"] for row in logged] == [2, 4, 6]
    # 36 tokens per step; a KPI call of 0.3 s at steps 2 and 4, inside the windows logged at
    # steps 4 and 6 (the first window holds the Trainer's start), counted, would cap their rate
    # below 2 * 36 / 0.3 = 240
    rates = [row["train/tokens_per_sec"] for row in logged[1:]]
    assert all(rate > 240 for rate in rates), rates
    assert wall > 0.9  # the KPIs did run


# ---------------------------------------------------------------------- the last total is logged
def test_a_cumulative_kpi_logs_its_value_at_the_end_of_fit_lightning(tmp_path):
    recorder = Recorder()
    cost = TrainingCost(price_per_device_hour=3.6, every_n_steps=50)
    monitor = lossplug.KPIMonitor([cost])
    trainer = quiet_trainer(tmp_path, recorder, [monitor], max_steps=60, limit_val_batches=0)
    trainer.fit(TinyLM(), make_loader(30))
    totals = recorder.series("kpi/cost/total")
    assert [step for step, _ in totals] == [50, 60]
    assert totals[1][1] > totals[0][1] > 0


def test_a_cumulative_kpi_logs_its_value_at_the_end_of_training_transformers(tmp_path):
    cost = TrainingCost(price_per_device_hour=3.6, every_n_steps=4)
    trainer = make_trainer(tmp_path, LossplugCallback([cost]), max_steps=6, eval_strategy="no")
    trainer.train()
    steps = [row["step"] for row in rows_with(trainer.state.log_history, "kpi/cost/total")]
    assert steps == [4, 6]


def test_a_cumulative_kpi_that_just_ran_does_not_run_again_at_the_end(tmp_path):
    calls = []
    total = KPI("total", lambda ctx: calls.append(ctx.event) or 1.0, every_n_steps=3)
    total.cumulative = True
    trainer = quiet_trainer(
        tmp_path, Recorder(), [lossplug.KPIMonitor([total])], max_steps=6, limit_val_batches=0
    )
    trainer.fit(TinyLM(), make_loader(6))
    assert calls == ["train_step", "train_step"]


# ----------------------------------------------------------------------- two monitors, two states
def test_two_loss_monitors_keep_their_own_checkpoint_state(tmp_path):
    first = lossplug.LossMonitor(train_prefix="a/train/", val_prefix="a/val/")
    second = lossplug.LossMonitor(train_prefix="b/train/", val_prefix="b/val/")
    assert first.state_key != second.state_key
    assert lossplug.LossMonitor().state_key == lossplug.LossMonitor().state_key
    checkpoint = tmp_path / "ckpt"
    ckpt = L.callbacks.ModelCheckpoint(dirpath=checkpoint, every_n_train_steps=3)
    trainer = quiet_trainer(
        tmp_path,
        Recorder(),
        [first, second, ckpt],
        max_steps=3,
        limit_val_batches=0,
        log_every_n_steps=2,
        enable_checkpointing=True,
    )
    trainer.fit(TinyLM(), make_loader(6))
    saved = torch.load(next(checkpoint.glob("*.ckpt")), weights_only=False)["callbacks"]
    assert saved[first.state_key]["tokens_total"] == first.tracker.tokens_total > 0
    assert saved[second.state_key]["tokens_total"] == second.tracker.tokens_total > 0
    resumed = [
        lossplug.LossMonitor(train_prefix="a/train/", val_prefix="a/val/"),
        lossplug.LossMonitor(train_prefix="b/train/", val_prefix="b/val/"),
    ]
    recorder = Recorder()
    trainer = quiet_trainer(
        tmp_path, recorder, resumed, max_steps=4, limit_val_batches=0, log_every_n_steps=2
    )
    trainer.fit(TinyLM(), make_loader(6), ckpt_path=str(next(checkpoint.glob("*.ckpt"))))
    # step 4's window holds step 3 (saved with the checkpoint) and step 4, for each monitor
    for monitor, prefix in zip(resumed, ("a", "b"), strict=True):
        assert dict(recorder.series(f"{prefix}/train/tokens"))[4] == monitor.tracker.tokens_total
        assert monitor.tracker.tokens_total > first.tracker.tokens_total


def test_a_checkpoint_keyed_by_the_class_name_still_resumes(tmp_path):
    """Checkpoints written before the state key depended on the prefixes."""
    checkpoint = tmp_path / "ckpt"
    ckpt = L.callbacks.ModelCheckpoint(dirpath=checkpoint, every_n_train_steps=3)
    first = lossplug.LossMonitor()
    trainer = quiet_trainer(
        tmp_path,
        Recorder(),
        [first, ckpt],
        max_steps=3,
        limit_val_batches=0,
        log_every_n_steps=2,
        enable_checkpointing=True,
    )
    trainer.fit(TinyLM(), make_loader(6))
    path = next(checkpoint.glob("*.ckpt"))
    saved = torch.load(path, weights_only=False)
    saved["callbacks"] = {"LossMonitor": saved["callbacks"].pop(first.state_key)}
    torch.save(saved, path)
    resumed = lossplug.LossMonitor()
    trainer = quiet_trainer(
        tmp_path, Recorder(), [resumed], max_steps=4, limit_val_batches=0, log_every_n_steps=2
    )
    trainer.fit(TinyLM(), make_loader(6), ckpt_path=str(path))
    assert resumed.tracker.tokens_total > first.tracker.tokens_total > 0


# ------------------------------------------------------------------- numbers that cannot be right
class UnshiftedLM(TinyLM):
    """Hugging Face-style labels (the inputs themselves) scored without ``shift=True``."""

    def _step(self, batch, stage):
        (rows_,) = batch
        tokens = rows_[:, : rows_.shape[1] // 2]
        logits = self(tokens)
        # a model that has learnt to copy its input: what training on these labels gives
        logits = logits + 20.0 * torch.nn.functional.one_hot(tokens, logits.shape[-1])
        loss, stats = lossplug.cross_entropy(logits, tokens, return_stats=True)
        return {"loss": loss, "stats": stats}


def accuracy_warnings(tmp_path, module, steps: int) -> list[str]:
    """The warnings about the token accuracy of a short run (LossMonitor every 2 steps)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(
            tmp_path, Recorder(), [lossplug.LossMonitor(log_every_n_steps=2)], max_steps=steps
        )
        trainer.fit(module, make_loader(steps), make_loader(1, seed=3))
    return [str(w.message) for w in caught if "token accuracy of" in str(w.message)]


def test_labels_equal_to_the_inputs_without_shift_are_warned_about(tmp_path):
    said = accuracy_warnings(tmp_path, UnshiftedLM(), steps=6)
    assert len(said) == 1, said
    assert "shift=True" in said[0] and "labels == input_ids" in said[0]


def test_an_honest_first_window_is_not_warned_about(tmp_path):
    assert not accuracy_warnings(tmp_path, TinyLM(), steps=4)


class UnshiftedLogitsLM(TinyLM):
    """Returns logits and unshifted labels while its loss shifts them: LossMonitor(shift=False)
    then scores both stages wrongly."""

    def _step(self, batch, stage):
        (rows_,) = batch
        tokens = rows_[:, : rows_.shape[1] // 2]
        logits = self(tokens)
        loss = lossplug.cross_entropy(logits, tokens, shift=True)
        return {"loss": loss, "logits": logits, "labels": tokens}


def test_the_loss_check_names_the_validation_values_too(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(
            tmp_path,
            Recorder(),
            [lossplug.LossMonitor(log_every_n_steps=2)],
            max_steps=4,
            val_check_interval=2,
        )
        trainer.fit(UnshiftedLogitsLM(), make_loader(4), make_loader(1, seed=3))
    said = [str(w.message) for w in caught if "is not the cross-entropy" in str(w.message)]
    assert len(said) == 1
    assert "train/perplexity" in said[0] and "val/perplexity" in said[0]
    assert "LossMonitor(shift=True)" in said[0]


def test_the_hf_example_waits_passively_like_the_main_job():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples"
    for name in ("finetune.py", "hf_trainer.py"):
        source = (root / name).read_text()
        set_at = source.find('os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")')
        assert 0 <= set_at < source.find("import torch"), name
