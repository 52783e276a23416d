"""KPIs in a real Trainer on CPU: schedule, errors, timeouts, NaN, targets, DDP, resume."""

from __future__ import annotations

import functools
import math
import threading
import time
import warnings

import pytest

import lossplug
from _tiny_lm import (
    NAMESPACES,
    CloseProcessGroup,
    InOrderShardsWithVal,
    make_loader,
    record_rank_kpi,
)
from lossplug.kpi import KPI, KPIContext, KPIResult, KPIRunner

L, TinyLM, Recorder = NAMESPACES["lightning.pytorch"]


def fit(tmp_path, kpis, *, max_steps, recorder=None, module=None, **kw):
    recorder = recorder if recorder is not None else Recorder()
    callbacks = [lossplug.KPIMonitor(kpis), *kw.pop("callbacks", [])]
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=recorder,
        callbacks=callbacks,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kw)
    trainer = L.Trainer(**defaults)
    val = make_loader(2, seed=5) if defaults["limit_val_batches"] else None
    trainer.fit(module or TinyLM(), make_loader(max(max_steps, 4)), val)
    return trainer, recorder


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_every_5_steps_logs_at_5_10_15(namespace, tmp_path):
    lightning, Module, RecorderClass = NAMESPACES[namespace]
    seen = []

    def steps_kpi(ctx: KPIContext) -> float:
        seen.append((ctx.step, ctx.model.training, ctx.event))
        return float(ctx.step) / 10

    recorder = RecorderClass()
    trainer = lightning.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=recorder,
        callbacks=[lossplug.KPIMonitor([KPI("steps", steps_kpi, every_n_steps=5)])],
        max_steps=15,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Module()
    trainer.fit(module, make_loader(15))
    assert recorder.series("kpi/steps") == [(5, 0.5), (10, 1.0), (15, 1.5)]
    assert [s for s, _ in recorder.series("kpi/steps/seconds")] == [5, 10, 15]
    # the model is in eval mode during the call and back in train mode after it
    assert [(s, training) for s, training, _ in seen] == [(5, False), (10, False), (15, False)]
    assert module.training


def test_a_raising_kpi_is_counted_and_training_finishes(tmp_path):
    def broken(ctx):
        raise ZeroDivisionError("no generations yet")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, recorder = fit(tmp_path, [KPI("broken", broken, every_n_steps=2)], max_steps=6)
    assert trainer.global_step == 6
    assert recorder.series("kpi/broken/errors") == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert recorder.series("kpi/broken") == []
    ours = [w for w in caught if "KPI 'broken' raised ZeroDivisionError" in str(w.message)]
    assert len(ours) == 1 and "Traceback" in str(ours[0].message)  # once, with the traceback


def test_on_error_raise_stops_a_strict_run(tmp_path):
    def broken(ctx):
        raise ValueError("bad")

    with pytest.raises(lossplug.kpi.KPIError, match=r"'strict' failed at step 2"):
        fit(tmp_path, [KPI("strict", broken, every_n_steps=2, on_error="raise")], max_steps=6)


def test_a_hanging_kpi_is_abandoned_at_its_timeout(tmp_path):
    release = threading.Event()

    def hangs(ctx):
        release.wait()  # forever, until the test ends
        return 1.0

    started = time.perf_counter()
    try:
        trainer, recorder = fit(
            tmp_path, [KPI("hangs", hangs, every_n_steps=2, timeout_s=1)], max_steps=6
        )
        elapsed = time.perf_counter() - started
    finally:
        release.set()
    assert trainer.global_step == 6
    # the first call waits its second; later ones are skipped while it still runs
    assert elapsed < 6.0
    assert recorder.series("kpi/hangs/timeouts") == [(2, 1.0), (4, 2.0), (6, 3.0)]
    first_cost = recorder.series("kpi/hangs/seconds")[0][1]
    assert 0.9 < first_cost < 2.5
    assert recorder.series("kpi/hangs") == []


def test_nan_is_reported_not_logged(tmp_path):
    values = iter([1.0, float("nan"), math.inf, 3.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, recorder = fit(
            tmp_path, [KPI("flaky", lambda ctx: next(values), every_n_steps=1)], max_steps=4
        )
    assert recorder.series("kpi/flaky") == [(1, 1.0), (4, 3.0)]
    assert recorder.series("kpi/flaky/nonfinite") == [(2, 1.0), (3, 2.0)]
    assert sum("non-finite" in str(w.message) for w in caught) == 1


def test_mappings_targets_and_validation_values_are_monitorable(tmp_path):
    def quality(ctx):
        return {"pass_rate": 0.1 * ctx.step, "latency_ms": 5.0}

    early_stop = L.callbacks.EarlyStopping(
        monitor="kpi/quality/pass_rate", stopping_threshold=0.5, mode="max"
    )
    kpis = [KPI("quality", quality, target=0.3)]  # default: at validation end
    trainer, recorder = fit(
        tmp_path,
        kpis,
        max_steps=20,
        callbacks=[early_stop],
        limit_val_batches=1,
        val_check_interval=2,
        module=TinyLM(),
    )
    pass_rate = recorder.series("kpi/quality/pass_rate")
    assert [s for s, _ in pass_rate] == [2, 4, 6]  # stopped once 0.6 >= 0.5
    assert trainer.should_stop and trainer.global_step == 6
    assert recorder.series("kpi/quality/latency_ms")[0] == (2, 5.0)
    assert recorder.series("kpi/quality/reached_at_step") == [(4, 4.0)]  # once
    assert trainer.callbacks[0].runner.states["quality"].best == pytest.approx(0.6)


def test_resume_keeps_the_schedule_and_the_state(tmp_path):
    checkpoint = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1
    )

    def kpis():
        return [KPI("steps", lambda ctx: float(ctx.step), every_n_steps=5, target=4)]

    first = Recorder()
    fit(
        tmp_path,
        kpis(),
        max_steps=6,
        recorder=first,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    second = Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=second,
        callbacks=[lossplug.KPIMonitor(kpis())],
        max_steps=12,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyLM(), make_loader(12), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    steps = [s for s, _ in first.series("kpi/steps") + second.series("kpi/steps")]
    assert steps == [5, 10]
    state = trainer.callbacks[0].runner.states["steps"]
    assert state.calls == 2 and state.reached_at_step == 5 and state.best == 10.0
    assert second.series("kpi/steps/reached_at_step") == []  # logged once, before the resume


def test_two_process_ddp_runs_a_rank_zero_kpi_once(tmp_path):
    calls = tmp_path / "calls.txt"
    kpi = KPI("score", functools.partial(record_rank_kpi, path=str(calls)), higher_is_better=False)
    # check_on_train_epoch_end=False: with val_check_interval=1 Lightning would check at epoch end
    early_stop = L.callbacks.EarlyStopping(
        monitor="kpi/score", stopping_threshold=97.5, mode="min", check_on_train_epoch_end=False
    )
    csv_logger = L.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        logger=csv_logger,
        callbacks=[lossplug.KPIMonitor([kpi]), early_stop, CloseProcessGroup()],
        max_steps=20,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyLM(), datamodule=InOrderShardsWithVal(64, batch_size=2))
    lines = calls.read_text().split()
    ranks, steps = lines[0::2], [int(s) for s in lines[1::2]]
    assert set(ranks) == {"0"}  # only rank 0 ran it
    # 100 - 3 = 97 met the threshold on every rank: training stopped there, no deadlock
    assert steps == [1, 2, 3]
    text = (tmp_path / "ddp" / "version_0" / "metrics.csv").read_text()
    assert text.count("\n3,") + text.count(",3\n") >= 1


def test_runner_without_lightning():
    runner = KPIRunner(
        [KPI("cost", lambda ctx: KPIResult(0.5 * ctx.step, samples=[{"a": 1}]), every_n_steps=2)]
    )
    assert [k.name for k in runner.due("train_step", step=3, epoch=0)] == []
    outcome = runner.run(runner.kpis[0], KPIContext(step=4))
    assert outcome.metrics["kpi/cost"] == 2.0 and outcome.samples == [{"a": 1}]
    assert runner.due("train_step", step=4, epoch=0) == []  # not twice at one step
    restored = KPIRunner([KPI("cost", lambda ctx: 0.0, every_n_steps=2)])
    restored.load_state_dict(runner.state_dict())
    assert restored.states["cost"].calls == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(name="bad name"), ValueError, r"name must be.*'bad name'"),
        (dict(fn=3), TypeError, r"fn must be callable"),
        (dict(every_n_steps=0), ValueError, r"every_n_steps.*0"),
        (dict(at=("test_end",)), ValueError, r"at must contain only.*'test_end'"),
        (dict(at=()), ValueError, r"would never run"),
        (dict(timeout_s=-1), ValueError, r"timeout_s.*-1"),
        (dict(on_error="ignore"), ValueError, r"on_error.*'ignore'"),
        (dict(target="high"), ValueError, r"target.*'high'"),
    ],
)
def test_bad_kpi_configuration(kwargs, error, pattern):
    options = dict(name="ok", fn=lambda ctx: 1.0)
    options.update(kwargs)
    with pytest.raises(error, match=pattern):
        KPI(options.pop("name"), options.pop("fn"), **options)


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match=r"unique.*\['x'\]"):
        KPIRunner([KPI("x", lambda ctx: 1.0), KPI("x", lambda ctx: 2.0)])
