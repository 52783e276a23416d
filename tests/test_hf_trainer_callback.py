"""LossplugCallback in a real ``transformers.Trainer`` on a tiny random Llama."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lossplug
from _reference import reference_values
from _tiny_lm import QUIET_TRAINING_ARGS, TINY_DECODER

transformers = pytest.importorskip("transformers")
from lossplug.integrations.transformers import (  # noqa: E402
    LossplugCallback,
    patch_causal_lm,
)

VOCAB, SEQ, PROMPT = 61, 12, 3
TOKENS_PER_ROW = SEQ - 1 - (PROMPT - 1)  # labels shifted by one; the prompt is not scored


def tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, **TINY_DECODER)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def rows(n: int, seed: int, *, uneven: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every row scores the same number of tokens, whatever order the Trainer draws them in,
    unless ``uneven`` (then row i has a prompt of PROMPT + i % 5 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    labels = ids.clone()
    for i in range(n):
        labels[i, : PROMPT + (i % 5 if uneven else 0)] = -100
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]


def make_trainer(tmp_path, callback, *, model=None, patched=True, collator=None, **overrides):
    model = model if model is not None else tiny_llama()
    if patched:
        patch_causal_lm(model)
    options = dict(
        QUIET_TRAINING_ARGS,
        output_dir=str(tmp_path / "out"),
        gradient_accumulation_steps=2,
        max_steps=6,
        eval_steps=3,
    )
    options.update(overrides)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=rows(40, seed=1),
        eval_dataset=rows(7, seed=2, uneven=True),  # batches of 3, 3, 1 rows, unequal tokens
        callbacks=[callback],
        data_collator=collator,
    )


def reference_val(model, dataset) -> dict[str, float]:
    """Token-weighted values over the eval set, in float64, at the model's weights."""
    with torch.no_grad():
        scored = [
            (model(input_ids=row["input_ids"][None]).logits[0], row["labels"]) for row in dataset
        ]
    return reference_values(scored, shift=True)


def rows_with(history, key):
    return [row for row in history if key in row]


def test_val_is_exact_and_train_is_logged_at_every_logging_step(tmp_path):
    seen = []

    def record(ctx):
        seen.append((ctx.step, ctx.event, ctx.metrics.get("val/perplexity")))
        return float(ctx.step)

    kpi = lossplug.KPI("steps", record, every_n_steps=3, at=("validation_end",), timeout_s=30)
    callback = LossplugCallback([kpi])
    trainer = make_trainer(tmp_path, callback)
    trainer.train()
    history = trainer.state.log_history

    train = rows_with(history, "loss")
    assert [row["step"] for row in train] == [2, 3, 4, 6]  # step 3: a KPI is due there
    for row in train:
        # each step trains 2 micro-batches of 2 rows: both micro-batches are counted
        assert row["train/tokens"] == row["step"] * 4 * TOKENS_PER_ROW
        # equal tokens per step: the Trainer's mean of step losses is the token-weighted value
        assert row["train/cross_entropy"] == pytest.approx(row["loss"], rel=1e-4)
        assert row["train/perplexity"] == pytest.approx(math.exp(row["train/cross_entropy"]))
        assert 0 <= row["train/token_accuracy"] <= 1 and row["train/entropy"] > 0

    val = rows_with(history, "val/perplexity")
    assert [row["step"] for row in val] == [3, 6]
    ref = reference_val(trainer.model, trainer.eval_dataset)  # the weights of the last eval
    last = val[-1]
    assert last["val/perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert last["val/cross_entropy"] == pytest.approx(ref["cross_entropy"], rel=1e-5)
    assert last["val/token_accuracy"] == pytest.approx(ref["token_accuracy"], abs=1e-9)
    assert last["val/tokens"] == ref["tokens"] == 7 * TOKENS_PER_ROW - (0 + 1 + 2 + 3 + 4 + 0 + 1)
    # eval_loss is a mean of batch means; ours is over the tokens
    assert abs(last["eval_loss"] - ref["cross_entropy"]) > 1e-4

    kpi_rows = [(row["step"], row["kpi/steps"]) for row in rows_with(history, "kpi/steps")]
    assert kpi_rows == [(3, 3.0), (3, 3.0), (6, 6.0), (6, 6.0)]  # train_step, validation_end
    steps = sorted({(s, e) for s, e, _ in seen})
    assert steps == [
        (3, "train_step"),
        (3, "validation_end"),
        (6, "train_step"),
        (6, "validation_end"),
    ]
    # at validation_end the KPI sees this evaluation's val/perplexity
    at_val = [v for s, e, v in seen if e == "validation_end"]
    assert at_val == [row["val/perplexity"] for row in val]
    assert all(row["kpi/steps/seconds"] >= 0 for row in rows_with(history, "kpi/steps"))


def test_training_that_ends_between_two_logs_logs_its_last_steps(tmp_path):
    trainer = make_trainer(tmp_path, LossplugCallback(), max_steps=5, eval_strategy="no")
    trainer.train()
    history = trainer.state.log_history
    train = rows_with(history, "train/tokens")
    assert [row["step"] for row in train] == [2, 4, 5]
    last = train[-1]
    assert "train_runtime" in last  # on the Trainer's end-of-training log
    assert last["train/tokens"] == 5 * 4 * TOKENS_PER_ROW  # every token trained on
    assert last["train/perplexity"] == pytest.approx(math.exp(last["train/cross_entropy"]))


def test_unpatched_model_is_told_once_how_to_patch_and_kpis_still_log(tmp_path):
    kpi = lossplug.KPI("steps", lambda ctx: float(ctx.step), every_n_steps=2, timeout_s=30)
    trainer = make_trainer(tmp_path, LossplugCallback([kpi]), patched=False, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    told = [w for w in caught if "patch_causal_lm" in str(w.message)]
    assert len(told) == 1 and "LlamaForCausalLM" in str(told[0].message)
    history = trainer.state.log_history
    assert not rows_with(history, "train/perplexity") and not rows_with(history, "val/perplexity")
    assert [(row["step"], row["kpi/steps"]) for row in rows_with(history, "kpi/steps")] == [
        (2, 2.0),
        (4, 4.0),
    ]


def test_a_failing_kpi_never_stops_training(tmp_path):
    def broken(ctx):
        raise RuntimeError("no such endpoint")

    kpi = lossplug.KPI("broken", broken, every_n_steps=2, timeout_s=30)
    trainer = make_trainer(tmp_path, LossplugCallback([kpi]), max_steps=4, eval_strategy="no")
    with pytest.warns(RuntimeWarning, match="no such endpoint"):
        trainer.train()
    errors = [
        row["kpi/broken/errors"]
        for row in rows_with(trainer.state.log_history, "kpi/broken/errors")
    ]
    assert errors == [1.0, 2.0]
    assert len(rows_with(trainer.state.log_history, "train/perplexity")) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(metrics="perplexity"), TypeError, "metrics must be a sequence"),
        (dict(metrics=("perplexity", "bleu")), ValueError, "'bleu'"),
        (dict(metrics=()), ValueError, "non-empty"),
        (dict(kpis=[lambda ctx: 1.0]), TypeError, "lossplug.KPI"),
    ],
)
def test_bad_arguments_are_refused_with_their_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossplugCallback(**kwargs)


def test_wandb_run_gets_the_values_under_their_own_names(tmp_path, monkeypatch):
    import wandb

    from lossplug.loggers import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # The Trainer's wandb.init passes no dir: W&B takes it from its process-wide settings, which
    # an earlier run in this process may have fixed before WANDB_DIR was set here.
    wandb.teardown()
    kpi = lossplug.KPI("steps", lambda ctx: float(ctx.step), every_n_steps=3, timeout_s=30)
    trainer = make_trainer(tmp_path, LossplugCallback([kpi], slice_by="parity"), report_to="wandb")
    trainer.eval_dataset = [{**row, "parity": i % 2} for i, row in enumerate(trainer.eval_dataset)]
    trainer.train()
    wandb.finish()
    run = read_run(tmp_path / "wandb", wait=30)
    assert run.complete, run.errors
    history = trainer.state.log_history
    keys = ("train/perplexity", "train/tokens", "val/perplexity", "val/perplexity/1", "kpi/steps")
    for key in keys:
        logged = [row[key] for row in rows_with(history, key)]
        assert [value for _, value in run.series(key)] == pytest.approx(logged), key
    assert not run.series("train/val/perplexity") and not run.series("train/train/perplexity")
    assert run.series("train/loss")  # the Trainer's own keys are untouched
    assert run.metrics["val/perplexity"].summary == ("min",)
    assert run.metrics["val/perplexity/0"].summary == ("min",)  # a slice's as the whole's
    assert run.metrics["val/tokens/0"].summary == ("last",)
    assert run.metrics["train/token_accuracy"].summary == ("max",)
    assert run.metrics["kpi/steps"].summary == ("max",)
    assert run.metrics["kpi/steps"].step_metric == "train/global_step"
    assert run.summary["val/perplexity"]["min"] == min(
        row["val/perplexity"] for row in rows_with(history, "val/perplexity")
    )


def test_ddp_with_torchrun_gives_the_single_process_values(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parent / "_hf_ddp_job.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(job), str(tmp_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # one process with twice the batch reads the same rows at each step
    from test_hf_slices import DDP_SOURCES, keep_strings, per_slice_reference, with_sources

    same_schedule = lossplug.KPI("steps", lambda ctx: float(ctx.step), every_n_steps=3)
    single = make_trainer(
        tmp_path / "single",
        LossplugCallback([same_schedule], slice_by="source"),
        collator=keep_strings,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=6,
    )
    single.eval_dataset = with_sources(rows(12, seed=2, uneven=True), DDP_SOURCES)
    single.train()
    reference = single.state.log_history
    ref_val = reference_val(single.model, single.eval_dataset)
    assert rows_with(reference, "val/perplexity")[-1]["val/perplexity"] == pytest.approx(
        ref_val["perplexity"], rel=1e-5
    )
    for got in ranks:  # every rank logs the reduced values
        history = got["history"]
        for key in ("train/tokens", "val/tokens"):
            assert [r[key] for r in rows_with(history, key)] == [
                r[key] for r in rows_with(reference, key)
            ], key
        assert rows_with(history, "val/tokens")[-1]["val/tokens"] == ref_val["tokens"]
        for key in ("train/cross_entropy", "val/perplexity", "val/token_accuracy"):
            assert [r[key] for r in rows_with(history, key)] == pytest.approx(
                [r[key] for r in rows_with(reference, key)], rel=1e-4
            ), key
        assert [(r["step"], r["kpi/steps"]) for r in rows_with(history, "kpi/steps")] == [
            (3, 3.0),
            (6, 6.0),
        ]
    assert ranks[0]["ran_on"] == [0, 0] and ranks[1]["ran_on"] == []  # run once, broadcast
    # per slice, each seen on one rank only: summed over both, equal to a float64 reference
    per_slice = per_slice_reference(single.model, single.eval_dataset, DDP_SOURCES)
    for got in ranks:
        last = rows_with(got["history"], "val/perplexity")[-1]
        for name, ref in per_slice.items():
            assert last[f"val/perplexity/{name}"] == pytest.approx(ref["perplexity"], rel=1e-4)
            assert last[f"val/tokens/{name}"] == ref["tokens"]


def test_resume_from_checkpoint_continues_the_window_tokens_and_kpi_state(tmp_path):
    def make(run: str):
        kpi = lossplug.KPI("steps", lambda ctx: float(ctx.step), every_n_steps=2, target=2.0)
        return make_trainer(
            tmp_path / run,
            LossplugCallback([kpi]),
            eval_strategy="no",
            save_strategy="steps",
            save_steps=3,  # step 3 is inside a logging window (logging_steps=2)
        )

    whole = make("whole")
    whole.train()
    resumed = make("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-3"))

    def train_rows(trainer, after):
        return [row for row in rows_with(trainer.state.log_history, "loss") if row["step"] > after]

    expected, got = train_rows(whole, 3), train_rows(resumed, 3)
    assert [row["step"] for row in got] == [row["step"] for row in expected] == [4, 6]
    for mine, theirs in zip(got, expected, strict=True):
        # the window at step 4 holds step 3's micro-batches, saved with the checkpoint
        assert mine["train/tokens"] == theirs["train/tokens"] == mine["step"] * 4 * TOKENS_PER_ROW
        assert mine["train/cross_entropy"] == pytest.approx(theirs["train/cross_entropy"], 1e-5)
        # the uninterrupted run's own loss (the resumed Trainer's "loss" at step 4 forgets step 3)
        assert mine["train/cross_entropy"] == pytest.approx(theirs["loss"], rel=1e-4)
    # the target was reached at step 2, before the checkpoint: not reached again after it
    reached = rows_with(whole.state.log_history, "kpi/steps/reached_at_step")
    assert [row["kpi/steps/reached_at_step"] for row in reached] == [2.0]
    after = [row for row in resumed.state.log_history if row["step"] > 3]
    assert [row["kpi/steps"] for row in rows_with(after, "kpi/steps")] == [4.0, 6.0]
    assert not rows_with(after, "kpi/steps/reached_at_step")


def test_added_after_init_and_reused_by_a_second_trainer_evaluate_only(tmp_path):
    callback = LossplugCallback()
    first = make_trainer(tmp_path / "a", LossplugCallback(), max_steps=2, eval_strategy="no")
    first.remove_callback(LossplugCallback)
    first.add_callback(callback)
    first.train()
    assert rows_with(first.state.log_history, "train/perplexity")

    second = make_trainer(tmp_path / "b", callback)
    metrics = second.evaluate()  # no training at all
    ref = reference_val(second.model, second.eval_dataset)
    assert metrics["val/perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert second.state.log_history[-1]["val/tokens"] == ref["tokens"]


def test_a_hanging_kpi_is_abandoned_and_training_goes_on(tmp_path):
    import threading

    release = threading.Event()
    kpi = lossplug.KPI("stuck", lambda ctx: release.wait(30), every_n_steps=2, timeout_s=0.2)
    callback = LossplugCallback([kpi])
    callback.runner.stop_grace_s = 0.3  # it never calls the model: nothing can stop it
    trainer = make_trainer(tmp_path, callback, max_steps=4, eval_strategy="no")
    try:
        with pytest.warns(RuntimeWarning, match="timeout_s=0.2"):
            trainer.train()
    finally:
        release.set()
    history = trainer.state.log_history
    assert [row["kpi/stuck/timeouts"] for row in rows_with(history, "kpi/stuck/timeouts")] == [
        1.0,
        2.0,  # skipped while the first call still runs: counted too
    ]
    assert trainer.state.global_step == 4 and len(rows_with(history, "train/perplexity")) == 2


def test_a_users_own_trainer_log_is_not_taken_for_a_training_log(tmp_path):
    class LogsItsOwnLoss(transformers.TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            self.trainer.log({"loss": 123.0})  # what a subclass or a user callback may do

    own = LogsItsOwnLoss()
    trainer = make_trainer(tmp_path, LossplugCallback(), max_steps=4, eval_strategy="no")
    own.trainer = trainer
    trainer.add_callback(own)
    trainer.train()
    history = trainer.state.log_history
    assert [row["train/tokens"] for row in rows_with(history, "train/tokens")] == [
        2 * 4 * TOKENS_PER_ROW,
        4 * 4 * TOKENS_PER_ROW,
    ]
    users = [row for row in history if row.get("loss") == 123.0]
    assert len(users) == 4 and not rows_with(users, "train/tokens")


def test_a_second_train_call_counts_its_own_tokens(tmp_path):
    callback = LossplugCallback()
    for run in ("first", "second"):
        trainer = make_trainer(tmp_path / run, callback, max_steps=2, eval_strategy="no")
        trainer.train()
        rows_ = rows_with(trainer.state.log_history, "train/tokens")
        assert [row["train/tokens"] for row in rows_] == [2 * 4 * TOKENS_PER_ROW], run
