"""KPI tables and summaries in a real offline W&B run, read back from its file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lossplug
from _tiny_lm import NAMESPACES, make_loader, quiet_trainer
from lossplug.kpi import KPI, KPIResult
from lossplug.kpi.builtin import TrainingCost
from lossplug.loggers import read_run, wandb_logger

_, TinyLM, _ = NAMESPACES["lightning.pytorch"]

MIXED_ROWS = [{"a": 1, "b": "x", "c": 0.5}, {"a": "one", "b": None, "c": 2}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kpi_wandb")
    torch.manual_seed(0)
    logger = wandb_logger("lossplug-kpi-tables", save_dir=root, verbose=False)
    # a file where W&B wants the folder of this KPI's tables: writing them fails with an OSError,
    # as on a full disk
    blocked = Path(logger.experiment.dir) / "media" / "table" / "kpi"
    blocked.mkdir(parents=True)
    (blocked / "diskfull").write_text("in the way")

    def rows(samples):
        return lambda ctx: KPIResult(float(ctx.step), samples=samples)

    kpis = [
        TrainingCost(price_per_device_hour=3600.0, every_n_steps=2),
        KPI("mixed", rows(MIXED_ROWS), every_n_steps=2),
        KPI("badrows", rows(["not a row"]), every_n_steps=2),
        KPI("diskfull", rows([{"a": 1}]), every_n_steps=2),
        KPI("pass.rate", lambda ctx: 0.1 * ctx.step, every_n_steps=2),
    ]
    callbacks = [lossplug.LossMonitor(log_every_n_steps=2), lossplug.KPIMonitor(kpis)]
    trainer = quiet_trainer(root, logger, callbacks, max_steps=4, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyLM(), make_loader(4))
    logger.experiment.finish()
    messages = [str(w.message) for w in caught]
    return read_run(root, wait=20.0), trainer, messages


def test_a_table_w_and_b_cannot_write_is_counted_and_the_values_still_land(run):
    data, trainer, messages = run
    assert data.complete and trainer.global_step == 4
    assert data.series("kpi/diskfull") == [(2, 2.0), (4, 4.0)]
    assert data.series("kpi/diskfull/table_errors") == [(2, 1.0), (4, 2.0)]
    assert data.series("kpi/diskfull/samples") == []
    ours = [m for m in messages if m.startswith("KPI 'diskfull': its sample rows at step 2")]
    assert len(ours) == 1 and "FileExistsError" in ours[0] and "Traceback" in ours[0]


def test_rows_that_are_not_rows_are_counted_and_the_values_still_land(run):
    data, _, messages = run
    assert data.series("kpi/badrows") == [(2, 2.0), (4, 4.0)]
    assert data.series("kpi/badrows/table_errors") == [(2, 1.0), (4, 2.0)]
    assert sum(m.startswith("KPI 'badrows': its sample rows") for m in messages) == 1


def test_a_column_of_mixed_types_is_logged_as_text(run):
    data, _, _ = run
    assert data.series("kpi/mixed") == [(2, 2.0), (4, 4.0)]
    tables = data.series("kpi/mixed/samples")
    assert [step for step, _ in tables] == [2, 4]
    table = json.loads((data.path.parent / "files" / tables[0][1]["path"]).read_text())
    assert table["columns"] == ["a", "b", "c"]
    # "a" mixes a number and a string: text; "c" holds numbers only (ints and floats alike)
    assert table["data"] == [["1", "x", 0.5], ["one", None, 2]]
    assert data.series("kpi/mixed/table_errors") == []


def test_running_totals_are_summarised_by_their_last_value(run):
    data, trainer, _ = run
    for key in ("kpi/cost/total", "kpi/cost/per_million_tokens"):
        assert data.metrics[key].summary == ("last",), key
        values = [v for _, v in data.series(key)]
        assert len(values) == 2 and data.summary[key] == {"last": values[-1]}, key
    totals = [v for _, v in data.series("kpi/cost/total")]
    assert totals[0] < totals[1]  # a "min" summary would have kept the first
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, lossplug.KPIMonitor)]
    assert monitor.runner.states["cost"].best is None
    # the counters beside it keep W&B's default summary
    assert data.metrics["kpi/diskfull/table_errors"].summary == ()


def test_a_dotted_name_gets_its_summary(run):
    data, _, _ = run
    # W&B reads an unescaped "." in define_metric as nesting and would never compute this max
    assert data.summary["kpi/pass.rate"] == {"max": pytest.approx(0.4)}
    # and the definition is read back under the key as logged, so the report finds it
    assert data.metrics["kpi/pass.rate"].summary == ("max",)
    assert "kpi/pass\\.rate" not in data.metrics
