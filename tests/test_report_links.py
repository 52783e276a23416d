"""``lossplug report``: the model ↔ business section, its JSON, and the figure, on a real run.

One offline W&B run is written by wandb itself, logged as Lightning, ``LossMonitor`` and
``KPIMonitor`` do: at each validation step a row of ``val/`` metrics (with per-slice
``val/perplexity/<slice>``), then a row of KPIs at the same ``trainer/global_step``; a running
cost (``kpi/cost/total``, as ``TrainingCost`` logs it) at steps of its own. The Spearman
correlations are checked against a float64 PyTorch reference that ranks in another way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _runs import finish_run, offline_run
from lossplug.cli import main
from lossplug.loggers import read_run
from lossplug.report import (
    LINK_METRIC,
    build_figure,
    cost_of_improvement,
    find_cost_key,
    link_kpis,
    numeric_keys,
    spearman,
)
from test_cli import _cells, _check_png

PROJECT = "lossplug-links-test"
EVAL_STEPS = [100, 200, 300, 400, 500, 600]
TRAIN_STEPS = list(range(50, 651, 50))
VAL_PPL = [64.0, 32.0, 20.0, 16.0, 12.0, 10.0]  # strictly decreasing
CODE_PPL = [80.0, 40.0, 44.0, 20.0, 18.0, 21.0]  # a slice that does not follow val exactly
PROSE = {200: 30.0, 400: 25.0}  # a slice logged twice only: fewer than 3 pairs, no link
PASS_RATE = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]  # strictly monotone in VAL_PPL
PASS_TARGET = 0.5  # met first at step 400
ERROR_RATE = [0.5, 0.25, 0.2, 0.125, 0.1, 0.0625]  # falls with perplexity: spearman +1
JUDGE = [1.0, 2.0, 2.0, 3.0, 3.0, 3.0]  # ties; a mapping KPI with one entry and a target of 3
RARE = {300: 0.5, 600: 0.75}  # a KPI with 2 points at validation steps only
TRAIN_ONLY = {150: 1.0, 250: 2.0, 350: 3.0, 450: 4.0}  # never at a validation step
PRICE_PER_STEP = 0.002  # the cost total is linear in the step
COST_STEPS = [50 + 100 * i for i in range(7)]  # 50, 150, ..., 650: never a validation step


def _train_ppl(step: int) -> float:
    # Falls by orders of magnitude at first, as a fine-tune's first steps do.
    return 5000.0 / (step / 50) ** 2 + 8.0


def reference_spearman(xs: list[float], ys: list[float]) -> float:
    """Float64 PyTorch: the average rank of v is #(< v) + (#(== v) + 1) / 2, then Pearson."""

    def ranks(values: list[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        less = (v[None, :] < v[:, None]).sum(1).double()
        equal = (v[None, :] == v[:, None]).sum(1).double()
        return less + (equal + 1) / 2

    return float(torch.corrcoef(torch.stack([ranks(xs), ranks(ys)]))[0, 1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished offline run: model metrics, slices, KPIs after validation, a running cost."""
    root = tmp_path_factory.mktemp("links_run")
    # As KPIMonitor defines them: max/min by higher_is_better, last for running totals.
    summaries = {
        "val/perplexity": "min",
        "kpi/pass_rate": "max",
        "kpi/error_rate": "min",
        "kpi/judge/score": "max",
        "kpi/cost/total": "last",
        "kpi/cost/per_million_tokens": "last",
    }
    run = offline_run(root, PROJECT, "links-run", summaries)
    for step in sorted(set(TRAIN_STEPS) | set(COST_STEPS) | set(TRAIN_ONLY)):
        row: dict = {"trainer/global_step": step}
        if step in TRAIN_STEPS:
            row |= {
                "train/perplexity": _train_ppl(step),
                "train/cross_entropy": math.log(_train_ppl(step)),
                "train/token_accuracy": step / 1000,
            }
        if step in COST_STEPS:
            row |= {
                "kpi/cost/total": PRICE_PER_STEP * step,
                "kpi/cost/per_million_tokens": 0.5,
                "kpi/cost/seconds": 0.001,
            }
        if step in TRAIN_ONLY:
            row["kpi/train_score"] = TRAIN_ONLY[step]
        run.log(row)
        if step not in EVAL_STEPS:
            continue
        i = EVAL_STEPS.index(step)
        # Validation, then the KPIs run at its end: two rows at the same global step.
        val = {
            "val/perplexity": VAL_PPL[i],
            "val/cross_entropy": math.log(VAL_PPL[i]),
            "val/token_accuracy": 0.5 + i / 20,
            "val/perplexity/code": CODE_PPL[i],
            "val/tokens/code": 1000.0 * (i + 1),
            "trainer/global_step": step,
        }
        if step in PROSE:
            val["val/perplexity/prose"] = PROSE[step]
        run.log(val)
        kpis = {
            "kpi/pass_rate": PASS_RATE[i],
            "kpi/pass_rate/seconds": 0.25,
            "kpi/error_rate": ERROR_RATE[i],
            "kpi/judge/score": JUDGE[i],
            "kpi/flat": 0.5,
            "trainer/global_step": step,
        }
        if PASS_RATE[i] >= PASS_TARGET and PASS_RATE[i - 1] < PASS_TARGET:
            kpis["kpi/pass_rate/reached_at_step"] = float(step)
        if JUDGE[i] >= 3 and JUDGE[i - 1] < 3:
            kpis["kpi/judge/reached_at_step"] = float(step)
        if step in RARE:
            kpis["kpi/rare"] = RARE[step]
        run.log(kpis)
    return finish_run(run, root)


def _expected_links() -> list[dict]:
    """Every link the run must give, from the logged lists, in the report's order."""
    kpis = {  # table order: kpi/ keys by name
        "kpi/error_rate": (ERROR_RATE, None),
        "kpi/flat": ([0.5] * 6, None),
        "kpi/judge/score": (JUDGE, 400),
        "kpi/pass_rate": (PASS_RATE, 400),
    }
    out = []
    for kpi, (values, target_step) in kpis.items():
        for metric, series in ((LINK_METRIC, VAL_PPL), ("val/perplexity/code", CODE_PPL)):
            constant = len(set(values)) == 1
            out.append(
                {
                    "kpi": kpi,
                    "metric": metric,
                    "spearman": None if constant else reference_spearman(values, series),
                    "points": len(EVAL_STEPS),
                    "target_step": target_step,
                    "perplexity_at_target": (
                        None if target_step is None else series[EVAL_STEPS.index(target_step)]
                    ),
                }
            )
    return out


def _report_json(run_dir: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["report", str(run_dir), "--json", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def test_links_in_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    links = _report_json(run_dir, capsys)["links"]
    expected = _expected_links()
    assert [(link["kpi"], link["metric"]) for link in links] == [
        (link["kpi"], link["metric"]) for link in expected
    ]
    for got, want in zip(links, expected, strict=True):
        if want["spearman"] is not None:
            assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-12), got
            want = {**want, "spearman": got["spearman"]}
        assert got == want
    by_pair = {(link["kpi"], link["metric"]): link for link in links}
    # A strictly monotone relation is exactly -1 or +1, not 0.9999999999999998.
    assert by_pair["kpi/pass_rate", LINK_METRIC]["spearman"] == -1.0
    assert by_pair["kpi/error_rate", LINK_METRIC]["spearman"] == 1.0
    # Ties: the average ranks give a value strictly between.
    assert -1.0 < by_pair["kpi/judge/score", LINK_METRIC]["spearman"] < -0.9
    # A constant KPI has no correlation: null in JSON, never NaN.
    assert by_pair["kpi/flat", LINK_METRIC]["spearman"] is None
    # Not linked: fewer than 3 points, never at a validation step, a running total, a slice
    # with 2 pairs, a per-slice count that is not a perplexity, bookkeeping.
    kpis = {link["kpi"] for link in links}
    assert not kpis & {"kpi/rare", "kpi/train_score", "kpi/cost/total", "kpi/pass_rate/seconds"}
    assert {link["metric"] for link in links} == {LINK_METRIC, "val/perplexity/code"}


def test_links_match_the_library(run_dir: Path) -> None:
    run = read_run(run_dir)
    links = {(link.kpi, link.metric): link for link in link_kpis(run)}
    link = links["kpi/pass_rate", LINK_METRIC]
    assert (link.spearman, link.points, link.target_step, link.perplexity_at_target) == (
        -1.0,
        6,
        400,
        16.0,
    )
    # --keys chooses the KPIs.
    assert {link.kpi for link in link_kpis(run, ["kpi/pass_rate"])} == {"kpi/pass_rate"}


def test_cost_per_improvement(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _report_json(run_dir, capsys)
    assert data["cost_key"] == "kpi/cost/total"
    costs = {item["kpi"]: item for item in data["cost_per_improvement"]}
    # KPIs with a direction; the constant one has none by its name, the cost's own keys and
    # the running totals are not priced.
    assert list(costs) == ["kpi/error_rate", "kpi/judge/score", "kpi/pass_rate", "kpi/train_score"]
    # By hand: the cost is PRICE_PER_STEP * step, logged at 50, 150, ... and interpolated at the
    # validation steps; pass_rate goes from 0.125 @ 100 to 0.75 @ 600.
    spent = PRICE_PER_STEP * (600 - 100)
    improvement = 0.75 - 0.125
    item = costs["kpi/pass_rate"]
    assert item["first"] == {"step": 100, "value": 0.125}
    assert item["best"] == {"step": 600, "value": 0.75}
    assert item["direction"] == "max" and item["note"] is None
    assert item["spent"] == pytest.approx(spent, rel=1e-12)
    assert item["improvement"] == improvement
    assert item["unit"] == 0.01
    assert item["cost_per_unit"] == pytest.approx(spent / improvement * 0.01, rel=1e-12)
    assert item["cost_per_unit"] == pytest.approx(0.016, rel=1e-12)
    # A lower-is-better KPI improves downwards: 0.5 @ 100 to 0.0625 @ 600.
    item = costs["kpi/error_rate"]
    assert item["direction"] == "min" and item["improvement"] == 0.5 - 0.0625
    assert item["cost_per_unit"] == pytest.approx(spent / 0.4375 * 0.01, rel=1e-12)
    # Ties: the best is its earliest step (3.0 first at 400).
    item = costs["kpi/judge/score"]
    assert item["best"] == {"step": 400, "value": 3.0} and item["unit"] == 0.1
    assert item["cost_per_unit"] == pytest.approx(PRICE_PER_STEP * 300 / 2.0 * 0.1, rel=1e-12)
    # Between steps 150 and 450, all inside the cost's steps (50 to 650).
    item = costs["kpi/train_score"]
    assert item["cost_per_unit"] == pytest.approx(PRICE_PER_STEP * 300 / 3.0 * 0.1, rel=1e-12)


def test_cost_outside_the_logged_steps(run_dir: Path) -> None:
    """A cost known only from step 250 on cannot price an improvement that began at step 100."""
    run = read_run(run_dir)
    run.history = [
        row
        for row in run.history
        if "kpi/cost/total" not in row or row["trainer/global_step"] >= 250
    ]
    item = {c.kpi: c for c in cost_of_improvement(run)}["kpi/pass_rate"]
    assert (item.spent, item.cost_per_unit) == (None, None)
    assert "not known at steps 100 and 600" in item.note and "from step 250" in item.note


def test_cost_key_option(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = read_run(run_dir)
    assert find_cost_key(run) == "kpi/cost/total"
    # Any running total can price the KPIs: here the tokens-based one, constant, so 0 spent.
    data = _report_json(run_dir, capsys, "--cost-key", "kpi/cost/per_million_tokens")
    item = {c["kpi"]: c for c in data["cost_per_improvement"]}["kpi/pass_rate"]
    assert (item["cost_key"], item["spent"], item["cost_per_unit"]) == (
        "kpi/cost/per_million_tokens",
        0.0,
        0.0,
    )
    assert main(["report", str(run_dir), "--cost-key", "kpi/nothing/total"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("lossplug report: error: --cost-key:") and "'kpi/nothing/total'" in err
    with pytest.raises(ValueError, match="cost_key 'kpi/nothing/total'"):
        cost_of_improvement(run, cost_key="kpi/nothing/total")


def test_text_section(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    section = out.split("model ↔ business: ", 1)[1]
    # The metrics table still has one row per key; no section line starts with a key.
    for key in ("val/perplexity", "kpi/pass_rate", "kpi/cost/total", "val/perplexity/code"):
        assert sum(line.split()[:1] == [key] for line in out.splitlines()) == 1, key
    lines = section.splitlines()
    assert lines[0] == "Spearman rank correlation of each KPI with perplexity over the run"
    assert _cells(lines[2]) == ["spearman", "points", "KPI", "metric", "perplexity at target"]
    rows = [line.split() for line in lines[3:11]]
    want = _expected_links()
    for cells, link in zip(rows, want, strict=True):
        rho = "n/a" if link["spearman"] is None else f"{link['spearman']:+.3f}"
        target = "-"
        if link["target_step"] is not None:
            target = f"{link['perplexity_at_target']:g} @ {link['target_step']}"
        assert cells == [rho, "6", link["kpi"], link["metric"], *target.split()], cells
    assert rows[-2] == ["-1.000", "6", "kpi/pass_rate", "val/perplexity", "16", "@", "400"]
    costs = lines[lines.index("") + 1 :]
    assert costs[0] == (
        "cost of improvement (kpi/cost/total from each KPI's first value to its best):"
    )
    assert "kpi/pass_rate: 0.016 per +0.01 (0.125 @ 100 -> 0.75 @ 600, 1 spent)" in costs
    assert "kpi/error_rate: 0.02286 per -0.01 (0.5 @ 100 -> 0.0625 @ 600, 1 spent)" in costs


def test_plot(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "report.png"
    assert main(["report", str(run_dir), "--plot", str(png)]) == 0
    assert f"plot written to {png}" in capsys.readouterr().out
    _check_png(png)

    fig = build_figure(read_run(run_dir))
    axes = {ax.get_title(): ax for ax in fig.axes}
    ppl = axes["perplexity"]
    assert ppl.get_yscale() == "log"
    labels = [line.get_label() for line in ppl.get_lines()]
    assert labels == ["train", "val", "val/code", "val/prose"]
    assert ppl.get_lines()[1].get_ydata().tolist() == VAL_PPL
    # Cross-entropy and token accuracy beside it, on the same row; KPIs below; one x axis.
    top = ppl.get_position()
    for title in ("cross_entropy", "token_accuracy"):
        assert axes[title].get_position().y0 == pytest.approx(top.y0)
        assert axes[title].get_position().x0 > top.x1
    kpi = axes["kpi/pass_rate"]
    assert kpi.get_position().y1 < top.y0
    assert kpi.get_shared_x_axes().joined(kpi, ppl)
    assert kpi.get_lines()[0].get_xdata().tolist() == EVAL_STEPS
    # One scatter per linked KPI: the KPI against val/perplexity, each point labelled by step.
    scatter = axes["kpi/pass_rate vs val/perplexity\nSpearman -1.00, 6 points"]
    assert not scatter.get_shared_x_axes().joined(scatter, ppl)
    # A log axis only where the values span more than a factor of 20: else too few ticks.
    assert scatter.get_xscale() == ("log" if max(VAL_PPL) / min(VAL_PPL) > 20 else "linear")
    assert scatter.collections[0].get_offsets().tolist() == [
        [p, r] for p, r in zip(VAL_PPL, PASS_RATE, strict=True)
    ]
    # Step labels in step order, the first and the last kept, none over another.
    labels = [t.get_text() for t in scatter.texts]
    assert labels[0] == str(EVAL_STEPS[0]) and labels[-1] == str(EVAL_STEPS[-1])
    assert set(labels) <= {str(s) for s in EVAL_STEPS}
    assert labels == sorted(labels, key=int)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in scatter.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    scatters = [title for title in axes if " vs " in title]
    assert [t.split(" vs ")[0] for t in scatters] == [
        "kpi/error_rate",
        "kpi/flat",
        "kpi/judge/score",
        "kpi/pass_rate",
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=2, max_size=12).filter(
        lambda pairs: len({x for x, _ in pairs}) > 1 and len({y for _, y in pairs}) > 1
    )
)
def test_spearman_matches_the_reference(pairs: list[tuple[int, int]]) -> None:
    xs, ys = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    assert spearman(xs, ys) == pytest.approx(reference_spearman(xs, ys), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=30, unique=True))
def test_spearman_of_a_monotone_relation_is_exact(xs: list[float]) -> None:
    order = sorted(xs)
    assert spearman(xs, [order.index(x) ** 2 + 0.5 for x in xs]) == 1.0
    assert spearman(xs, [-3 * x for x in xs]) == -1.0
    assert spearman(xs, [7.0] * len(xs)) is None
    with pytest.raises(ValueError, match="xs and ys must be as long"):
        spearman(xs, xs[1:])


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run logged as ``transformers.Trainer`` with ``LossplugCallback``: ``train/global_step``.

    The Trainer's own row and the callback's row (validation values and KPIs together) come at
    each logging step, so W&B's ``_step`` counts two rows per step.
    """
    import wandb

    root = tmp_path_factory.mktemp("trainer_run")
    run = wandb.init(mode="offline", dir=root, project=PROJECT, name="trainer-run")
    run.define_metric("kpi/accuracy", step_metric="train/global_step", summary="max")
    for i, step in enumerate(EVAL_STEPS):
        run.log({"train/loss": 3.0 - i / 10, "train/global_step": step})
        row = {"val/perplexity": VAL_PPL[i], "kpi/accuracy": PASS_RATE[i]}
        if step == 400:
            row["kpi/accuracy/reached_at_step"] = float(step)
        run.log({**row, "train/global_step": step})
    run.finish()
    assert read_run(root, wait=30).complete
    return root


def test_trainer_run_pairs_by_its_global_step(
    trainer_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _report_json(trainer_run, capsys)
    assert data["run"]["step_key"] == "train/global_step"
    # The target step is the Trainer's global step: the perplexity logged at that step.
    assert data["links"] == [
        {
            "kpi": "kpi/accuracy",
            "metric": LINK_METRIC,
            "spearman": -1.0,
            "points": 6,
            "target_step": 400,
            "perplexity_at_target": VAL_PPL[EVAL_STEPS.index(400)],
        }
    ]


def test_section_says_why_there_is_no_link(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lossplug.loggers import RunData
    from lossplug.report import format_links

    run = read_run(run_dir)
    # --keys leaving the KPIs out leaves the section out, and says nothing.
    assert main(["report", str(run_dir), "--keys", "val/*"]) == 0
    assert "model ↔ business" not in capsys.readouterr().out
    assert format_links(link_kpis(run, ["val/*"]), [], run) == ""
    # A run with KPIs but no val/perplexity; one whose KPIs meet it at 2 steps only.
    no_val = RunData(path=run.path, history=[r for r in run.history if LINK_METRIC not in r])
    assert format_links([], [], no_val) == "model ↔ business: no val/perplexity logged"
    two_steps = [
        row
        for row in run.history
        if LINK_METRIC in row or row["trainer/global_step"] in RARE or "kpi/cost/total" in row
    ]
    few = RunData(path=run.path, history=two_steps)
    assert link_kpis(few) == [] and "kpi/pass_rate" in numeric_keys(few)
    assert format_links([], [], few) == (
        "model ↔ business: no KPI has 3 or more values logged at steps with val/perplexity"
    )
