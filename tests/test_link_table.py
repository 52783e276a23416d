"""The model ↔ business link in W&B itself: KPI descriptions in the run's config, and a table of
val/perplexity beside the outcome KPIs with a scatter plot per KPI, from both trainers, read back
from real offline runs."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

import lossplug
from _tiny_lm import NAMESPACES, make_loader, quiet_trainer
from lossplug.kpi import KPI
from lossplug.kpi.builtin import Throughput
from lossplug.loggers import read_run, wandb_logger
from lossplug.monitoring.links import LinkTable

_, TinyLM, _ = NAMESPACES["lightning.pytorch"]

COLUMNS = ["step", "val/perplexity", "kpi/pass_rate"]
PASS_RATE = {
    "higher_is_better": True,
    "target": 0.25,
    "primary": None,
    "cumulative": False,
    "outcome": True,
    "unit": "share",
}


def pass_rate() -> KPI:
    """An outcome KPI with a target, run after each evaluation and at the end of training: its
    value grows with each call, so the end-of-training value at the last evaluation step differs
    from that evaluation's."""
    calls = []

    def rate(ctx):
        calls.append(ctx.event)
        return 0.1 * len(calls)

    return KPI(
        "pass_rate", rate, at=("validation_end", "train_end"), target=0.25, unit="share",
        timeout_s=None,
    )  # fmt: skip


def throughput() -> KPI:
    """The built-in, which measures the run rather than the model (``outcome=False``)."""
    kpi = Throughput(every_n_steps=2)
    return kpi if not kpi.outcome else Throughput(every_n_steps=2, outcome=False)


def table_at(run, key: str) -> list[tuple[int, list[str], list[list]]]:
    """Every table logged under ``key``: ``(step, columns, rows)``, in logging order."""
    tables = []
    for step, ref in run.series(key):
        table = json.loads((run.path.parent / "files" / ref["path"]).read_text())
        tables.append((step, table["columns"], table["data"]))
    return tables


def check_link(run, eval_steps: list[int]) -> None:
    """The config, the final table and the scatter plot against the run's own history."""
    assert run.complete, run.errors
    described = run.config["lossplug_kpis"]
    assert described["kpi/pass_rate"] == PASS_RATE
    assert described["kpi/throughput"]["outcome"] is False
    # the non-outcome KPI and the outcome KPI's counters were logged, and are not columns
    assert run.series("kpi/throughput/tokens_per_sec")
    assert run.series("kpi/pass_rate/seconds") and run.series("kpi/pass_rate/reached_at_step")

    perplexity = run.series("val/perplexity")
    assert [step for step, _ in perplexity] == eval_steps
    last = {}  # the history's last value of the KPI at each step
    for step, value in run.series("kpi/pass_rate"):
        last[step] = value
    want = [[step, value, last[step]] for step, value in perplexity]
    columns, rows = run.table("link/table")
    assert columns == COLUMNS
    assert rows == want  # the very floats of the history, not close ones

    chart = run.chart("link/kpi/pass_rate")
    assert chart.preset == "wandb/scatter/v0"
    assert (chart.x, chart.y) == ("val/perplexity", "kpi/pass_rate")
    assert chart.title == "kpi/pass_rate vs val/perplexity"
    assert chart.points() == [(value, kpi) for _, value, kpi in want]
    assert run.chart("link/kpi/throughput/tokens_per_sec") is None

    # logged after each evaluation, then once more at the end: the KPI's end-of-training value
    # at the last evaluation step replaces that evaluation's own
    tables = table_at(run, "link/table")
    assert [step for step, _, _ in tables] == [*eval_steps, eval_steps[-1]]
    evaluated = {}  # the history's first value of the KPI at each step: the evaluation's
    for step, value in run.series("kpi/pass_rate"):
        evaluated.setdefault(step, value)
    first = [[step, value, evaluated[step]] for step, value in perplexity]
    assert tables[-2][2] == first and tables[-1][2] == want != first


class NoisyTinyLM(TinyLM):
    """Training draws from torch's and Python's random streams: a logger that drew from them
    too would change the final weights."""

    def forward(self, tokens):
        hidden = self.embed(tokens)
        if self.training:
            hidden = hidden + 0.01 * (1 + random.random()) * torch.randn_like(hidden)
        return self.head(hidden)


def fit_lightning(root, callbacks) -> torch.nn.Module:
    torch.manual_seed(0)
    random.seed(0)
    module = NoisyTinyLM()
    logger = wandb_logger("lossplug-link", save_dir=root, verbose=False)
    # validation after steps 3 and 6, and a sanity check first that is not logged
    validation = dict(val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=1)
    trainer = quiet_trainer(root, logger, callbacks, max_steps=6, **validation)
    trainer.fit(module, make_loader(6), make_loader(2, seed=9))
    logger.experiment.finish()
    return module


def test_lightning_run_logs_the_link_table_and_scatter(tmp_path):
    monitor = lossplug.KPIMonitor([pass_rate(), throughput()])
    callbacks = [lossplug.LossMonitor(log_every_n_steps=2), monitor]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a lost table would warn
        module = fit_lightning(tmp_path / "with", callbacks)
    run = read_run(tmp_path / "with", wait=20.0)
    check_link(run, [3, 6])
    assert all("trainer/global_step" in row for row in run.history if "link/table" in row)
    # the rows go in the checkpoint, as plain data
    saved = json.loads(json.dumps(monitor.state_dict()["links"]))
    resumed = LinkTable(monitor.kpis)
    resumed.load_state_dict(saved)
    assert resumed.rows() == run.table("link/table")[1]
    # and training went exactly as without lossplug
    reference = fit_lightning(tmp_path / "without", [])
    for name, value in module.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name


def test_transformers_run_logs_the_link_table_and_scatter(tmp_path, monkeypatch):
    import wandb

    pytest.importorskip("transformers")
    from lossplug.integrations.transformers import LossplugCallback
    from test_hf_trainer_callback import make_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # the Trainer's wandb.init passes no dir: W&B takes it from its process-wide settings, which
    # an earlier run in this process may have fixed before WANDB_DIR was set here
    wandb.teardown()
    callback = LossplugCallback([pass_rate(), throughput()])
    trainer = make_trainer(tmp_path, callback, report_to="wandb")  # evaluations at steps 3, 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
    wandb.finish()
    run = read_run(tmp_path / "wandb", wait=30)
    assert run.step_key() == "train/global_step"
    check_link(run, [3, 6])
    assert all("train/global_step" in row for row in run.history if "link/table" in row)
    history = trainer.state.log_history  # what the Trainer logged is what W&B got
    logged = [(row["step"], row["val/perplexity"]) for row in history if "val/perplexity" in row]
    assert logged == run.series("val/perplexity")


# ------------------------------------------------------------------------- the table on its own
def test_only_outcome_values_become_columns():
    kpis = [
        KPI("code", len, cumulative=("programs",)),
        KPI("code/speedup", len),
        KPI("cost", len, outcome=False),
    ]
    links = LinkTable(kpis)
    links.record(2, {"kpi/code/pass": 0.5, "kpi/code/programs": 40.0, "kpi/code/seconds": 1.0})
    links.record(2, {"kpi/code/speedup": 1.5, "kpi/code/speedup/errors": 1.0, "kpi/cost": 3.0})
    links.record(2, {"val/perplexity": 8.0, "val/perplexity/code": 7.0, "train/perplexity": 9.0})
    links.record(2, {"kpi/code/reached_at_step": 2.0, "kpi/other": 1.0, "kpi/code/flag": True})
    assert links.columns() == ["step", "val/perplexity", "kpi/code/pass", "kpi/code/speedup"]
    assert links.rows() == [[2, 8.0, 0.5, 1.5]]


def test_rows_are_evaluation_steps_with_the_last_value_logged_at_each():
    links = LinkTable([KPI("score", len)])
    links.record(1, {"kpi/score": 0.1})  # no evaluation at step 1: dropped once step 2 comes
    links.record(2, {"val/perplexity": 9.0})
    links.record(4, {"kpi/score": 0.2, "val/perplexity": 8.0})
    links.record(4, {"kpi/score": 0.3})
    assert links.rows() == [[2, 9.0, None], [4, 8.0, 0.3]]
    steps = [[2, {"val/perplexity": 9.0}], [4, {"kpi/score": 0.3, "val/perplexity": 8.0}]]
    assert links.state_dict()["steps"] == steps


def test_no_outcome_kpi_or_no_evaluation_logs_no_table():
    written = []
    only_run = LinkTable([KPI("cost", len, outcome=False)])
    only_run.record(2, {"val/perplexity": 9.0, "kpi/cost": 1.0})
    no_eval = LinkTable([KPI("score", len)])
    no_eval.record(2, {"kpi/score": 1.0})
    for links in (only_run, no_eval):
        assert not links.publish(lambda *table: written.append(table), step=2)
    assert written == []


def test_a_writer_that_fails_warns_once_and_never_raises():
    links = LinkTable([KPI("score", len)])
    links.record(2, {"val/perplexity": 9.0, "kpi/score": 1.0})

    def full_disk(columns, rows, keys):
        torch.randn(3)  # whatever a logger draws is given back to training
        raise OSError("no space left on device")

    before = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="could not be logged at step 2.*no space left"):
        assert not links.publish(full_disk, step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not links.publish(full_disk, step=3)  # warned once
    assert torch.equal(torch.get_rng_state(), before)
    assert links.publish(lambda *table: None, step=4)
    assert not links.publish(lambda *table: None, step=4, only_if_changed=True)


def test_the_config_description_names_targets_units_and_outcomes():
    from lossplug.monitoring.kpis import KPISession

    session = KPISession([pass_rate(), throughput()])
    described = session.describe()
    assert described["kpi/pass_rate"] == PASS_RATE
    assert described["kpi/throughput"]["outcome"] is False
    assert json.loads(json.dumps(described)) == described  # plain data, as a config holds
