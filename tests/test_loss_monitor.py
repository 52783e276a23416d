"""LossMonitor in a real Trainer on CPU: exact values at optimizer steps, validation, resume."""

from __future__ import annotations

import math

import pytest
import torch

import lossplug
from _reference import reference_values
from _tiny_lm import (
    NAMESPACES,
    CloseProcessGroup,
    InOrderShards,
    logged_at,
    make_loader,
    quiet_trainer,
)

L = NAMESPACES["lightning.pytorch"][0]
NAMES = ("cross_entropy", "perplexity", "token_accuracy", "entropy")


def expected(seen) -> dict[str, float]:
    """Float64 values over recorded (logits, labels) micro-batches, independent of lossplug."""
    return reference_values(seen, shift=True)


def make_trainer(tmp_path, logger, *callbacks, every=None, monitor=None, lightning=L, **kw):
    """A quiet Trainer whose callbacks are ``monitor``, then ``callbacks``; the monitor is by
    default a LossMonitor that logs every ``every`` steps (its own default when None)."""
    if monitor is None:
        monitor = lossplug.LossMonitor(**({} if every is None else {"log_every_n_steps": every}))
    return quiet_trainer(tmp_path, logger, [monitor, *callbacks], lightning=lightning, **kw)


def assert_close(got: float, want: float, key: str) -> None:
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (key, got, want)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_logs_exact_windows_at_optimizer_steps(namespace, tmp_path):
    lightning, Module, Recorder = NAMESPACES[namespace]
    torch.manual_seed(0)
    module, recorder = Module(record=True), Recorder()
    trainer = make_trainer(
        tmp_path, recorder, every=2, max_steps=6, limit_val_batches=0, lightning=lightning
    )
    trainer.fit(module, make_loader(6))
    steps = [step for step, _ in recorder.series("train/perplexity")]
    assert steps == [2, 4, 6]
    seen = module.seen["train"]
    tokens_so_far = 0
    for index, step in enumerate(steps):
        want = expected(seen[2 * index : 2 * index + 2])
        row = logged_at(recorder, step)
        for name in NAMES:
            assert_close(row[f"train/{name}"], want[name], name)
        tokens_so_far += want["tokens"]
        assert row["train/tokens"] == tokens_so_far  # cumulative
        assert row["train/tokens_per_sec"] > 0
    epoch_rows = recorder.series("train/perplexity_epoch")
    assert len(epoch_rows) == 1
    assert_close(epoch_rows[0][1], expected(seen)["perplexity"], "epoch perplexity")
    assert "train/perplexity" in trainer.callback_metrics


def test_gradient_accumulation_logs_only_at_optimizer_steps(tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]
    module, recorder = Module(record=True), Recorder()
    trainer = make_trainer(
        tmp_path, recorder, every=1, max_steps=3, accumulate_grad_batches=4, limit_val_batches=0
    )
    trainer.fit(module, make_loader(12))
    rows = recorder.series("train/cross_entropy")
    assert [step for step, _ in rows] == [1, 2, 3]
    seen = module.seen["train"]
    assert len(seen) == 12
    for index, (_, value) in enumerate(rows):
        assert_close(value, expected(seen[4 * index : 4 * index + 4])["cross_entropy"], "window")


@pytest.mark.parametrize("end", ["max_steps", "max_epochs"])
def test_the_last_window_is_logged_when_fit_ends_inside_it(end, tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]
    module, recorder = Module(record=True), Recorder()
    stop = dict(max_steps=5) if end == "max_steps" else dict(max_epochs=1, max_steps=-1)
    trainer = make_trainer(
        tmp_path, recorder, every=2, accumulate_grad_batches=2, limit_val_batches=0, **stop
    )
    trainer.fit(module, make_loader(10))
    assert [step for step, _ in recorder.series("train/perplexity")] == [2, 4, 5]
    seen = module.seen["train"]
    assert len(seen) == 10
    row = logged_at(recorder, 5)
    want = expected(seen[8:])
    for name in NAMES:
        assert_close(row[f"train/{name}"], want[name], name)
    assert row["train/tokens"] == expected(seen)["tokens"]  # every token trained on


@pytest.mark.parametrize("mode", ["logits", "custom"])
def test_logits_and_extract_forms_give_the_same_numbers(mode, tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]
    results = {}
    for form in ("stats", mode):
        torch.manual_seed(0)
        module, recorder = Module(mode=form), Recorder()
        extract = None
        if form == "custom":

            def extract(outputs, batch):
                return outputs["my_logits"], outputs["my_labels"]

        monitor = lossplug.LossMonitor(log_every_n_steps=1, shift=True, extract=extract)
        trainer = make_trainer(
            tmp_path, recorder, monitor=monitor, max_steps=3, limit_val_batches=0
        )
        trainer.fit(module, make_loader(3))
        results[form] = recorder.series("train/perplexity")
    assert [s for s, _ in results["stats"]] == [s for s, _ in results[mode]] == [1, 2, 3]
    for (_, a), (_, b) in zip(results["stats"], results[mode], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6)


def test_validation_aggregate_is_monitorable_and_sanity_checks_are_not_logged(tmp_path):
    lightning, Module, Recorder = NAMESPACES["lightning.pytorch"]
    module, recorder = Module(record=True), Recorder()
    stop = lightning.callbacks.EarlyStopping(
        monitor="val/perplexity", stopping_threshold=1e6, mode="min"
    )
    trainer = make_trainer(
        tmp_path, recorder, stop, every=1, max_steps=8, val_check_interval=3, num_sanity_val_steps=2
    )
    trainer.fit(module, make_loader(8), make_loader(3, seed=5))
    val_rows = recorder.series("val/perplexity")
    # the first validation run (after step 3) meets the threshold and stops training
    assert [step for step, _ in val_rows] == [3]
    assert trainer.global_step == 3 and trainer.should_stop
    # sanity-check batches (2) were seen by the module but are not in the logged aggregate
    val_seen = module.seen["val"]
    assert len(val_seen) == 2 + 3
    want = expected(val_seen[2:])
    row = logged_at(recorder, 3)
    for name in NAMES:
        assert_close(row[f"val/{name}"], want[name], name)
    assert row["val/tokens"] == want["tokens"]
    assert float(trainer.callback_metrics["val/perplexity"]) == pytest.approx(want["perplexity"])


def test_module_returning_no_statistics_fails_at_the_first_step(tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]
    trainer = make_trainer(tmp_path, Recorder(), max_steps=5, limit_val_batches=0)
    module = Module(mode="none")
    with pytest.raises(ValueError, match=r"LossMonitor found no token statistics.*training_step"):
        trainer.fit(module, make_loader(5))
    assert trainer.global_step <= 1


def test_validate_alone_returns_and_logs_the_values_once_and_test_says_it_logs_nothing(tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]
    module, recorder = Module(record=True), Recorder()
    trainer = make_trainer(tmp_path, recorder)
    (results,) = trainer.validate(module, make_loader(3, seed=5))
    want = expected(module.seen["val"])
    for name in NAMES:
        assert_close(results[f"val/{name}"], want[name], name)
    assert results["val/tokens"] == want["tokens"]
    assert [value for _, value in recorder.series("val/perplexity")] == [
        pytest.approx(want["perplexity"])
    ]  # once, not once by the monitor and again by Lightning

    class WithTest(Module):
        def test_step(self, batch, batch_idx):
            return self.validation_step(batch, batch_idx)

    with pytest.warns(UserWarning, match=r"trainer.test\(\) logs nothing.*trainer.validate"):
        trainer.test(WithTest(), make_loader(2, seed=6))


def test_a_validation_step_returning_nothing_fails_at_the_sanity_check(tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]

    class LogsOnly(Module):
        def validation_step(self, batch, batch_idx):
            self.log("my_val", 1.0)  # the usual step that returns nothing

    trainer = make_trainer(
        tmp_path, Recorder(), max_steps=8, val_check_interval=4, num_sanity_val_steps=1
    )
    with pytest.raises(ValueError, match=r"no token statistics.*validation_step.*stages="):
        trainer.fit(LogsOnly(), make_loader(8), make_loader(2))
    assert trainer.global_step == 0  # before any training


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(log_every_n_steps=0), ValueError, r"log_every_n_steps.*0"),
        (dict(metrics=("perplexity", "bleu")), ValueError, r"metrics.*'bleu'"),
        (dict(metrics="perplexity"), TypeError, r"metrics must be a sequence"),
        (dict(train_prefix="x/", val_prefix="x/"), ValueError, r"must differ.*'x/'"),
        (dict(stages=("test",)), ValueError, r"stages.*'test'"),
        (dict(extract=3), TypeError, r"extract must be callable"),
        (dict(backend="cuda"), ValueError, r"backend.*'cuda'"),
        # every other argument, at construction rather than at the first step
        (dict(log_every_n_steps="10"), TypeError, r"log_every_n_steps.*'10'"),
        (dict(log_every_n_steps=True), TypeError, r"log_every_n_steps.*True"),
        (dict(metrics=None), TypeError, r"metrics.*None"),
        (dict(metrics=()), ValueError, r"metrics.*non-empty"),
        (dict(metrics=("perplexity", "perplexity")), ValueError, r"metrics.*repeats"),
        (dict(train_prefix=1), TypeError, r"train_prefix.*1"),
        (dict(val_prefix=None), TypeError, r"val_prefix.*None"),
        (dict(prog_bar="yes"), TypeError, r"prog_bar.*'yes'"),
        (dict(log_epoch=1), TypeError, r"log_epoch.*1"),
        (dict(stages="train"), TypeError, r"stages.*'train'"),
        (dict(stages=()), ValueError, r"stages.*at least one"),
        (dict(ignore_index="a"), TypeError, r"ignore_index.*'a'"),
        (dict(ignore_index=-100.0), TypeError, r"ignore_index.*-100\.0"),
        (dict(shift="yes"), TypeError, r"shift.*'yes'"),
        (dict(softcap=-1), ValueError, r"softcap.*-1"),
        (dict(softcap=0.0), ValueError, r"softcap.*0\.0"),
        (dict(softcap=float("inf")), ValueError, r"softcap.*inf"),
        (dict(softcap=float("nan")), ValueError, r"softcap.*nan"),
        (dict(softcap="30"), TypeError, r"softcap.*'30'"),
        (dict(softcap=True), TypeError, r"softcap.*True"),
        (dict(backend=None), TypeError, r"backend.*None"),
        (dict(check_loss="no"), TypeError, r"check_loss.*'no'"),
    ],
)
def test_bad_configuration(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        lossplug.LossMonitor(**kwargs)


def test_good_configuration_is_kept():
    import numpy as np

    monitor = lossplug.LossMonitor(
        log_every_n_steps=np.int64(5),  # e.g. read from a config
        metrics=["perplexity"],
        stages=["val"],
        ignore_index=np.int32(0),
        softcap=30,
        shift=True,
    )
    assert monitor.keys("val") == ["val/perplexity", "val/tokens"]
    assert monitor.op_kwargs == {"ignore_index": 0, "shift": True, "softcap": 30.0}
    assert type(monitor.log_every_n_steps) is int and type(monitor.op_kwargs["ignore_index"]) is int


def test_resume_continues_aggregates_and_the_step_axis(tmp_path):
    _, Module, Recorder = NAMESPACES["lightning.pytorch"]

    def run(max_steps, recorder, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        module = Module()
        trainer = make_trainer(
            tmp_path,
            recorder,
            *([] if checkpoint is None else [checkpoint]),
            every=3,
            max_steps=max_steps,
            limit_val_batches=0,
            enable_checkpointing=checkpoint is not None,
        )
        trainer.fit(module, make_loader(4), ckpt_path=ckpt_path)
        return trainer

    whole = Recorder()
    run(9, whole)
    checkpoint = NAMESPACES["lightning.pytorch"][0].callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    first, second = Recorder(), Recorder()
    run(4, first, checkpoint=checkpoint)  # ends inside a window: logs it (step 4), then saves
    run(9, second, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    steps = [s for s, _ in first.series("train/perplexity") + second.series("train/perplexity")]
    assert steps == [3, 4, 6, 9]  # every step once, strictly increasing
    want = dict(whole.series("train/perplexity"))
    got = dict(second.series("train/perplexity"))
    assert math.isclose(got[9], want[9], rel_tol=1e-9)
    whole_tokens = dict(whole.series("train/tokens"))
    resumed_tokens = dict(first.series("train/tokens")) | dict(second.series("train/tokens"))
    for step in (3, 6, 9):  # the cumulative count goes on across the resume
        assert resumed_tokens[step] == whole_tokens[step], step


def _read_csv(path) -> dict[int, dict[str, float]]:
    import csv

    rows: dict[int, dict[str, float]] = {}
    with open(path) as handle:
        for record in csv.DictReader(handle):
            step = int(record.pop("step"))
            values = {k: float(v) for k, v in record.items() if v not in ("", None)}
            rows.setdefault(step, {}).update(values)
    return rows


def test_two_process_ddp_equals_one_process(tmp_path):
    lightning, Module, Recorder = NAMESPACES["lightning.pytorch"]
    # lr=0: the model stays fixed, so both runs score exactly the same tokens with the same weights
    torch.manual_seed(0)
    module = Module(lr=0.0)
    csv_logger = lightning.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    ddp = make_trainer(
        tmp_path,
        csv_logger,
        CloseProcessGroup(),
        every=2,
        max_steps=4,
        limit_val_batches=0,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    ddp.fit(module, datamodule=InOrderShards(16, batch_size=2))
    logged = _read_csv(tmp_path / "ddp" / "version_0" / "metrics.csv")

    torch.manual_seed(0)
    single_module, recorder = Module(lr=0.0), Recorder()
    single = make_trainer(tmp_path, recorder, every=2, max_steps=4, limit_val_batches=0)
    single.fit(single_module, datamodule=InOrderShards(16, batch_size=4))
    want = {step: logged_at(recorder, step) for step, _ in recorder.series("train/perplexity")}
    assert sorted(step for step in logged if "train/perplexity" in logged[step]) == [2, 4]
    for step, row in want.items():
        for name in (*NAMES, "tokens"):
            key = f"train/{name}"
            assert math.isclose(logged[step][key], row[key], rel_tol=1e-6), (step, key)


def test_token_totals_summarise_as_their_last_value_in_a_real_wandb_run(tmp_path):
    from lossplug.loggers import read_run, wandb_logger

    _, Module, _ = NAMESPACES["lightning.pytorch"]
    torch.manual_seed(0)
    logger = wandb_logger("lossplug-summary", offline=True, save_dir=tmp_path, verbose=False)
    trainer = make_trainer(
        tmp_path, logger, every=2, max_steps=4, val_check_interval=2, limit_val_batches=1
    )
    trainer.fit(Module(), make_loader(4), make_loader(1, seed=5))
    logger.experiment.finish()
    data = read_run(tmp_path, wait=20.0)
    assert data.complete, data.errors
    for key in ("train/tokens", "val/tokens"):
        assert data.metrics[key].summary == ("last",), (key, data.metrics[key])
        assert data.summary[key] == {"last": data.series(key)[-1][1]}, (key, data.summary[key])
    assert data.metrics["train/perplexity"].summary == ("min",)


def test_checkpoint_named_after_val_perplexity_is_one_file_in_dirpath(tmp_path):
    """Lightning turns "{val/perplexity}" into "val/perplexity=…" in the file name, and the "/"
    then makes a folder; with auto_insert_metric_name=False the key's slash stays out."""
    lightning, Module, Recorder = NAMESPACES["lightning.pytorch"]
    torch.manual_seed(0)
    recorder = Recorder()
    checkpoint = lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        filename="step{step}-ppl{val/perplexity:.2f}",
        auto_insert_metric_name=False,
        monitor="val/perplexity",
        mode="min",
    )
    trainer = make_trainer(
        tmp_path,
        recorder,
        checkpoint,
        every=1,
        max_steps=6,
        val_check_interval=2,
        enable_checkpointing=True,
    )
    trainer.fit(Module(), make_loader(6), make_loader(2, seed=5))
    logged = recorder.series("val/perplexity")
    assert [step for step, _ in logged] == [2, 4, 6]
    best_step, best = min(logged, key=lambda row: row[1])
    written = sorted(p.relative_to(tmp_path / "ckpt") for p in (tmp_path / "ckpt").rglob("*"))
    assert [str(p) for p in written] == [f"step{best_step}-ppl{best:.2f}.ckpt"]
    assert float(checkpoint.best_model_score) == pytest.approx(best)
