"""KPIs in a real Trainer on CPU: schedule, errors, timeouts, NaN, targets, DDP, resume."""

from __future__ import annotations

import functools
import math
import signal
import sys
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
    quiet_trainer,
    record_rank_kpi,
)
from lossplug.kpi import KPI, KPIContext, KPIResult, KPIRunner

L, TinyLM, Recorder = NAMESPACES["lightning.pytorch"]


def fit(tmp_path, kpis, *, max_steps, recorder=None, module=None, **kw):
    recorder = recorder if recorder is not None else Recorder()
    callbacks = [lossplug.KPIMonitor(kpis), *kw.pop("callbacks", [])]
    settings = dict(max_steps=max_steps, limit_val_batches=0)
    settings.update(kw)
    trainer = quiet_trainer(tmp_path, recorder, callbacks, **settings)
    val = make_loader(2, seed=5) if settings["limit_val_batches"] else None
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
    trainer = quiet_trainer(
        tmp_path,
        recorder,
        [lossplug.KPIMonitor([KPI("steps", steps_kpi, every_n_steps=5)])],
        lightning=lightning,
        max_steps=15,
        limit_val_batches=0,
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
        release.wait()  # forever, until the test ends: no model call can stop it
        return 1.0

    monitor = lossplug.KPIMonitor([KPI("hangs", hangs, every_n_steps=2, timeout_s=1)])
    monitor.runner.stop_grace_s = 0.5  # training waits this long for it to stop
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recorder = Recorder()
            trainer = quiet_trainer(tmp_path, recorder, [monitor], max_steps=6, limit_val_batches=0)
            trainer.fit(TinyLM(), make_loader(6))
        elapsed = time.perf_counter() - started
    finally:
        release.set()
    assert trainer.global_step == 6
    # said once, loudly, since it could not be stopped; a slow but sound KPI needs a larger
    # timeout_s
    said = [str(w.message) for w in caught if "ran past timeout_s=1 at step 2" in str(w.message)]
    assert len(said) == 1 and "give it a larger timeout_s" in said[0]
    assert "could not be stopped" in said[0]
    # the first call waits its second and the grace; later ones are skipped while it still runs
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
    trainer = quiet_trainer(
        tmp_path, second, [lossplug.KPIMonitor(kpis())], max_steps=12, limit_val_batches=0
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
    trainer = quiet_trainer(
        tmp_path,
        csv_logger,
        [lossplug.KPIMonitor([kpi]), early_stop, CloseProcessGroup()],
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        max_steps=20,
        val_check_interval=1,
        limit_val_batches=1,
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
    assert_kpi_refuses(kwargs, error, pattern)


def assert_kpi_refuses(kwargs, error, pattern):
    """A KPI named "ok" returning 1.0, with ``kwargs`` (which may replace the name or the
    function), raises ``error`` matching ``pattern``."""
    options = dict(name="ok", fn=lambda ctx: 1.0)
    options.update(kwargs)
    with pytest.raises(error, match=pattern):
        KPI(options.pop("name"), options.pop("fn"), **options)


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match=r"unique.*\['x'\]"):
        KPIRunner([KPI("x", lambda ctx: 1.0), KPI("x", lambda ctx: 2.0)])


def test_kpis_get_a_finite_timeout_by_default_and_run_off_the_training_thread(tmp_path):
    on_main_thread = {}

    def where(ctx):
        on_main_thread[ctx.step] = threading.current_thread() is threading.main_thread()
        return 1.0

    @lossplug.kpi(every_n_steps=2)
    def decorated(ctx):
        return 2.0

    default = KPI("default", where, every_n_steps=2)
    assert default.timeout_s == decorated.timeout_s == lossplug.kpi.DEFAULT_TIMEOUT_S == 300.0
    # so that a hang can be abandoned, the call runs on a worker thread that training outlives
    fit(tmp_path, [default, decorated], max_steps=2)
    assert on_main_thread == {2: False}
    # None stays an explicit choice: inline, no limit
    inline = KPI("inline", where, every_n_steps=2, timeout_s=None)
    assert inline.timeout_s is None
    fit(tmp_path, [inline], max_steps=4)
    assert on_main_thread[4] is True


@pytest.mark.parametrize("timeout_s", [None, 0.5], ids=["inline", "threaded"])
def test_sys_exit_in_a_kpi_is_an_error_not_the_end_of_training(tmp_path, timeout_s):
    def quits(ctx):
        sys.exit("giving up")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, recorder = fit(
            tmp_path, [KPI("quits", quits, every_n_steps=2, timeout_s=timeout_s)], max_steps=4
        )
    assert trainer.global_step == 4
    assert recorder.series("kpi/quits/errors") == [(2, 1.0), (4, 2.0)]
    assert sum("KPI 'quits' raised SystemExit: giving up" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("timeout_s", [None, 0.5], ids=["inline", "threaded"])
def test_keyboard_interrupt_in_a_kpi_still_stops_training(tmp_path, timeout_s):
    def interrupted(ctx):
        raise KeyboardInterrupt

    recorder = Recorder()
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT while it shuts down
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after an interrupt
            fit(
                tmp_path,
                [KPI("interrupted", interrupted, every_n_steps=2, timeout_s=timeout_s)],
                max_steps=6,
                recorder=recorder,
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert recorder.series("kpi/interrupted/errors") == []  # not counted: obeyed
    assert not any(step > 2 for step, _ in recorder.rows if step is not None)


def _missing_metric_warnings(caught):
    return [str(w.message) for w in caught if "which is not logged" in str(w.message)]


def test_a_metric_that_is_never_logged_is_named_after_the_first_validation(tmp_path):
    from lossplug.kpi.builtin import TimeToTarget

    def early_reader(ctx):  # reads val/perplexity before any validation: not a mistake
        return ctx.metrics.get("val/perplexity", 0.0)

    kpis = [
        TimeToTarget("val/perplexty", 8.0),  # the typo
        TimeToTarget("val/perplexity", 1e6),
        KPI("early", early_reader, every_n_steps=1),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, recorder = fit(
            tmp_path,
            kpis,
            max_steps=6,
            callbacks=[lossplug.LossMonitor(log_every_n_steps=2)],
            limit_val_batches=1,
            val_check_interval=2,
        )
    messages = _missing_metric_warnings(caught)
    assert len(messages) == 1, messages  # once, for three validations
    assert messages[0].startswith("KPI 'time_to_val_perplexty' reads metric 'val/perplexty'")
    assert "after the first validation (step 2)" in messages[0]
    assert "closest logged: 'val/perplexity'" in messages[0]
    assert recorder.series("kpi/time_to_val_perplexity/step")  # the right key: reached
    assert recorder.series("kpi/time_to_val_perplexty/step") == []


def test_without_validation_a_missing_metric_is_named_at_the_end_of_training(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            tmp_path,
            [KPI("reads", lambda ctx: ctx.metrics["train/perplexityy"], every_n_steps=2)],
            max_steps=4,
            callbacks=[lossplug.LossMonitor(log_every_n_steps=1)],
        )
    messages = _missing_metric_warnings(caught)
    assert len(messages) == 1
    assert "'train/perplexityy' (closest logged: 'train/perplexity'" in messages[0]
    assert "by the end of training" in messages[0]


def test_missing_metrics_without_lightning():
    runner = KPIRunner([KPI("reads", lambda ctx: ctx.metrics.get("val/acc"), every_n_steps=1)])
    outcome = runner.run(runner.kpis[0], KPIContext(step=1, metrics={"val/accuracy": 0.5}))
    assert outcome.status == "nothing"
    with pytest.warns(RuntimeWarning, match=r"'val/acc' \(closest logged: 'val/accuracy'\)"):
        assert runner.warn_missing_metrics(["val/accuracy"]) == {"reads": ["val/acc"]}
    assert runner.warn_missing_metrics(["val/accuracy"]) == {}  # once
    assert runner.warn_missing_metrics(["val/accuracy", "val/acc"]) == {}


def test_sample_rows_that_are_not_rows_lose_the_table_not_the_value():
    runner = KPIRunner([KPI("rows", lambda ctx: KPIResult(2.0, samples=[1, 2]), every_n_steps=1)])
    with pytest.warns(RuntimeWarning, match=r"KPI 'rows': its sample rows at step 1 could not"):
        outcome = runner.run(runner.kpis[0], KPIContext(step=1))
    assert outcome.status == "ok" and outcome.samples is None
    assert outcome.metrics["kpi/rows"] == 2.0
    assert outcome.metrics["kpi/rows/table_errors"] == 1.0
    assert runner.states["rows"].errors == 0 and runner.states["rows"].best == 2.0


def test_cumulative_values_have_no_best_and_no_target():
    def spend(ctx):
        return {"pass_rate": 0.1 * ctx.step, "dollars": 5.0 * ctx.step}

    mixed = KPI("mixed", spend, cumulative=("dollars",), primary="pass_rate", target=0.2)
    total = KPI("total", lambda ctx: 5.0 * ctx.step, cumulative=True, higher_is_better=False)
    runner = KPIRunner([mixed, total])
    for step in (1, 2, 3):
        metrics = runner.run(mixed, KPIContext(step=step)).metrics
        runner.run(total, KPIContext(step=step))
    assert metrics["kpi/mixed/dollars"] == 15.0
    assert runner.states["mixed"].best == pytest.approx(0.3)  # follows pass_rate
    assert runner.states["mixed"].reached_at_step == 2
    assert runner.states["total"].best is None  # lower is better, but the first total is not best
    assert [mixed.is_cumulative(k) for k in ("kpi/mixed/dollars", "kpi/mixed/pass_rate")] == [
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("kpis", "kwargs", "error", "pattern"),
    [
        (None, {}, TypeError, r"kpis must be a list of KPI objects.*got None"),
        ("throughput", {}, TypeError, r"kpis must be a list of KPI objects.*got 'throughput'"),
        ([print], {}, TypeError, r"kpis must hold only KPI.*print.*lossplug.KPI\(name, fn\)"),
        ([KPIResult], {}, TypeError, r"kpis must hold only KPI.*KPIResult"),
        ({"a": KPI("a", print)}, {}, TypeError, r"kpis must be a list.*\{'a'"),
        ([KPI("a", print), 3], {}, TypeError, r"kpis must hold only KPI.*got 3"),
        ([KPI("a", print), KPI("a", len)], {}, ValueError, r"unique.*\['a'\]"),
        ([], {"log_samples": "no"}, TypeError, r"log_samples must be True or False.*'no'"),
    ],
)
def test_bad_monitor_arguments(kpis, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        lossplug.KPIMonitor(kpis, **kwargs)


def test_a_single_kpi_needs_no_list():
    monitor = lossplug.KPIMonitor(KPI("one", lambda ctx: 1.0))
    assert [k.name for k in monitor.kpis] == ["one"]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(name="../x"), ValueError, r"name must be.*got '\.\./x'"),
        (dict(name="a//b"), ValueError, r"name must be.*'a//b'"),
        (dict(name="a/"), ValueError, r"name must be.*'a/'"),
        (dict(name="x/./y"), ValueError, r"name must be.*'x/\./y'"),
        (dict(name="v1."), ValueError, r"name must be.*'v1\.'"),
        (dict(name="a\\b"), ValueError, r"name must be.*'a\\\\b'"),
        (dict(name="tab\there"), ValueError, r"name must be.*'tab\\there'"),
        (dict(name=3), TypeError, r"name must be a str, got int 3"),
        (dict(at=5), TypeError, r"at must be an event name.*5"),
        (dict(higher_is_better="no"), TypeError, r"higher_is_better must be True or False.*'no'"),
        (dict(rank_zero_only=None), TypeError, r"rank_zero_only must be True or False.*None"),
        (dict(uses_model=1), TypeError, r"uses_model must be True or False.*1"),
        (dict(primary=""), ValueError, r"primary must name an entry"),
        (dict(cumulative="total"), TypeError, r"cumulative must be True, False or.*'total'"),
        (dict(cumulative=()), ValueError, r"cumulative must name at least one entry"),
        (dict(cumulative=True, target=5.0), ValueError, r"target=5.0 is meaningless.*cumulative"),
        (dict(cumulative=["a"], target=5.0), ValueError, r"give primary="),
        (dict(cumulative=["a"], target=5.0, primary="a"), ValueError, r"primary entry 'a' is c"),
    ],
)
def test_more_bad_kpi_configuration(kwargs, error, pattern):
    assert_kpi_refuses(kwargs, error, pattern)


def test_kpi_decorator_takes_options_by_keyword():
    with pytest.raises(TypeError, match=r"kpi\(\) takes the KPI's name.*got 100.*every_n_steps"):
        lossplug.kpi(100)
