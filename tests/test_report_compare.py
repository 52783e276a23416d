"""``lossplug report`` over several real fine-tunes, the outcome-only links, and the figures.

Two tiny Lightning runs that differ only in their learning rate log offline to W&B through
``LossMonitor`` and ``KPIMonitor`` (an outcome KPI with a target, throughput and a priced cost);
the comparison table, its JSON and the overlaid figure are checked against the runs read back.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import lossplug
from _tiny_lm import NAMESPACES, make_loader, quiet_trainer
from lossplug.cli import main
from lossplug.kpi import KPI
from lossplug.kpi.builtin import Throughput, TrainingCost
from lossplug.loggers import read_run, wandb_logger
from lossplug.report import build_figure, summarize
from lossplug.report.compare import compare_runs
from lossplug.report.plot import build_comparison_figure

_, TinyLM, _ = NAMESPACES["lightning.pytorch"]
LEARNING_RATES = (0.02, 0.2)
STEPS, EVERY = 40, 10
TARGET = 0.5  # pass_rate is step / 40: met at step 20


def _pass_rate(ctx) -> float:
    return min(1.0, ctx.step / STEPS)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one save dir per learning rate, each with a finished offline run."""
    root = tmp_path_factory.mktemp("fine_tunes")
    for lr in LEARNING_RATES:
        torch.manual_seed(0)
        save_dir = root / f"lr{lr}"
        logger = wandb_logger("lossplug-compare", save_dir=save_dir, name=f"lr-{lr}", verbose=False)
        kpis = [
            KPI("pass_rate", _pass_rate, target=TARGET, uses_model=False),
            Throughput(every_n_steps=EVERY),
            TrainingCost(price_per_device_hour=3600.0, currency="USD", every_n_steps=EVERY),
        ]
        callbacks = [lossplug.LossMonitor(log_every_n_steps=5), lossplug.KPIMonitor(kpis)]
        trainer = quiet_trainer(
            save_dir,
            logger,
            callbacks,
            max_steps=STEPS,
            val_check_interval=EVERY,
            limit_val_batches=2,
        )
        trainer.fit(TinyLM(lr=lr), make_loader(STEPS), make_loader(2, seed=1))
        logger.experiment.finish()
        assert read_run(save_dir, wait=30).complete
    return root


@pytest.fixture(scope="module")
def runs(runs_root: Path) -> list:
    return [read_run(runs_root / f"lr{lr}") for lr in LEARNING_RATES]


def _report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _best(run, key: str) -> float:
    return min(v for _, v in run.series(key))


def test_a_folder_of_runs_gives_one_row_per_run(runs_root, runs, capsys) -> None:
    code, out, err = _report(capsys, str(runs_root))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 runs compared; each cell: final (best@step)"
    head = lines[1].split()
    assert head[:4] == ["run", "state", "steps", "wall"]
    assert "val/perplexity" in head and "kpi/pass_rate" in head and "(kpi/cost/total)" in head
    assert head[head.index("val/perplexity") + 1] == "(min)"
    assert head[head.index("(kpi/cost/total)") - 1] == "USD"
    # machinery KPIs keep their columns: the table shows what each run did
    assert any(h.startswith("kpi/throughput/") for h in head)
    for lr, run, line in zip(LEARNING_RATES, runs, lines[2:4], strict=True):
        assert line.split()[:3] == [f"lr-{lr}", "finished", str(STEPS)]
        final = run.series("val/perplexity")[-1][1]
        assert f"{lossplug.report.fmt_number(final)} (" in line
    assert code == main(["report", *(str(runs_root / f"lr{lr}") for lr in LEARNING_RATES)])


def test_the_json_holds_the_same_numbers_as_the_runs(runs_root, runs, capsys) -> None:
    code, out, _ = _report(capsys, str(runs_root), "--json")
    data = json.loads(out)
    assert code == 0 and data["not_read"] == [] and len(data["runs"]) == 2
    for run, row in zip(runs, data["runs"], strict=True):
        assert row["label"] == run.name and row["run"]["state"] == "finished"
        assert row["run"]["last_step"] == STEPS
        values = {item["key"]: item for item in row["values"]}
        ppl = values["val/perplexity"]
        assert ppl["final"]["value"] == run.series("val/perplexity")[-1][1]
        assert ppl["best"]["value"] == _best(run, "val/perplexity") and ppl["direction"] == "min"
        assert values["kpi/pass_rate"]["best"] == {"step": STEPS, "value": 1.0}
        assert row["cost_key"] == "kpi/cost/total"
        assert row["cost"] == run.series("kpi/cost/total")[-1][1] > 0
        assert row["wall_seconds"] > 0
    # the higher learning rate learns faster on this data
    finals = [r["values"][0]["final"]["value"] for r in data["runs"]]
    assert finals[1] < finals[0]


def test_keys_that_match_nothing_in_any_run_are_an_error(runs_root, capsys) -> None:
    code, out, err = _report(capsys, str(runs_root), "--keys", "val/perplexty")
    assert code == 2 and out == ""
    assert "no numeric key of the 2 runs matches --keys val/perplexty" in err


def test_a_run_that_cannot_be_read_is_listed_with_its_reason(runs_root, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    code, out, err = _report(capsys, str(runs_root / "lr0.02"), str(missing))
    assert code == 2
    assert out.startswith("1 run compared")
    assert f"not read:\n  - no such file or folder: {missing}" in out
    assert f"error: no such file or folder: {missing}" in err


def test_the_comparison_figure_overlays_the_runs(runs) -> None:
    rows = compare_runs(runs)
    keys = [item.key for item in rows[0].values]
    fig = build_comparison_figure(runs, keys)
    axes = {ax.get_title(): ax for ax in fig.axes}
    ppl = axes["perplexity"]
    assert ppl.get_yscale() == "log"
    curves = [line for line in ppl.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in curves] == [run.name for run in runs]
    assert len({line.get_color() for line in curves}) == 2
    for run, line in zip(runs, curves, strict=True):
        assert line.get_ydata().tolist() == [v for _, v in run.series("val/perplexity")]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [run.name for run in runs]
    targets = [line for line in axes["kpi/pass_rate"].get_lines() if line.get_label() == "_target"]
    assert targets and all(list(line.get_ydata()) == [TARGET, TARGET] for line in targets)
    _assert_no_empty_cell(fig)


def test_links_leave_the_run_machinery_out_unless_asked(runs_root, capsys) -> None:
    run_dir = str(runs_root / "lr0.2")
    _, out, _ = _report(capsys, run_dir, "--json")
    linked = {link["kpi"] for link in json.loads(out)["links"]}
    assert linked == {"kpi/pass_rate"}
    _, text, _ = _report(capsys, run_dir)
    (line,) = [line for line in text.splitlines() if line.startswith("not linked: ")]
    assert "kpi/throughput/tokens_per_sec" in line and "kpi/throughput/samples_per_sec" in line
    assert "--link KEY" in line and "kpi/pass_rate" not in line
    cost_lines = text.split("cost of improvement", 1)[1].splitlines()[1:]
    assert [line.split(":")[0] for line in cost_lines if line] == ["kpi/pass_rate"]

    _, out, _ = _report(capsys, run_dir, "--json", "--link", "kpi/throughput/*")
    linked = {link["kpi"] for link in json.loads(out)["links"]}
    assert "kpi/pass_rate" in linked and "kpi/throughput/tokens_per_sec" in linked
    assert not any(k.startswith("kpi/cost/") for k in linked)

    # a --link that names no KPI of the run is a mistake worth saying (a typo, a wrong run)
    code, out, err = _report(capsys, run_dir, "--link", "kpi/throughput/token_per_sec")
    assert code == 2 and out == ""
    assert "--link kpi/throughput/token_per_sec names no KPI of this run" in err
    assert "kpi/throughput/tokens_per_sec" in err


def test_the_run_figure_draws_targets_units_and_readable_labels(runs) -> None:
    run = runs[1]
    fig = build_figure(run)
    axes = {ax.get_title(): ax for ax in fig.axes}
    kpi = axes["kpi/pass_rate"]
    lines = {line.get_label(): line for line in kpi.get_lines()}
    assert list(lines["_target"].get_ydata()) == [TARGET, TARGET]
    assert list(lines["_met"].get_xdata()) == [20, 20]
    texts = [t.get_text() for t in kpi.texts]
    assert "target 0.5" in texts and "met @ 20" in texts
    assert axes["kpi/cost/total"].get_ylabel() == "USD"
    # a running total grows from near zero: its spread is no reason for a log axis
    assert axes["kpi/cost/total"].get_yscale() == "linear"
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:  # beside the panel, never over its curves
            assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    scatter = next(ax for ax in fig.axes if ax.get_title().startswith("kpi/pass_rate vs"))
    boxes = [t.get_window_extent(renderer) for t in scatter.texts]
    assert boxes and not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert len([t for t in scatter.get_xticklabels() if t.get_text()]) >= 3
    _assert_no_empty_cell(fig)


def test_epoch_keys_take_the_direction_of_their_base_key(runs) -> None:
    rows = {row.key: row for row in summarize(runs[0])}
    assert rows["train/perplexity"].direction_from == "define_metric"
    epoch = rows["train/perplexity_epoch"]
    assert (epoch.direction, epoch.direction_from) == ("min", "define_metric")


def _assert_no_empty_cell(fig) -> None:
    by_grid: dict[int, list] = {}
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        if spec is not None:
            by_grid.setdefault(id(spec.get_gridspec()), []).append(spec)
    for specs in by_grid.values():
        grid = specs[0].get_gridspec()
        used = {cell for spec in specs for cell in range(spec.num1, spec.num2 + 1)}
        assert used == set(range(grid.nrows * grid.ncols))
    assert not math.isnan(fig.get_figwidth())
