"""``lossplug report``: the table, JSON and plot of a real offline W&B run, and its exit codes.

One run is written by wandb itself (offline, in a temporary folder) with lossplug's keys, then
reported on in-process through ``main([...])`` and in real subprocesses (``python -m
lossplug.cli`` and the ``lossplug`` console script), intact, truncated, garbage and missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _runs import finish_run, offline_run
from lossplug.cli import main
from lossplug.loggers import read_run
from lossplug.report import plot_run, summarize

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = [10 * (i + 1) for i in range(12)]
# Values with at most 4 significant digits, so that the table shows them exactly as logged.
TRAIN_PPL = [64.0, 40.0, 30.0, 22.5, 18.0, 14.0, 11.5, 9.25, 8.0, 7.0, 6.25, 5.5]
TRAIN_CE = [4.5, 3.75, 3.5, 3.0, 2.875, 2.625, 2.5, 2.25, 2.0, 2.0, 1.875, 1.75]
EVAL_STEPS = [40, 80, 120]
VAL_PPL = [20.0, 12.5, 13.25]  # best in the middle: best differs from both first and last
PASS_RATE = [0.25, 0.75, 0.5]
SPEEDUP = [1.125, 1.5, 1.75]
PROJECT = "lossplug-cli-test"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The save dir of a finished offline run logged like LossMonitor and KPIMonitor do."""
    root = tmp_path_factory.mktemp("cli_run")
    # train/cross_entropy and kpi/speedup get no summary: their direction is guessed by name.
    run = offline_run(
        root,
        PROJECT,
        "cli-run",
        {"train/perplexity": "min", "val/perplexity": "min", "kpi/pass_rate": "max"},
        no_summary=["kpi/pass_rate/seconds"],
    )
    for i, step in enumerate(STEPS):
        row = {
            "train/perplexity": TRAIN_PPL[i],
            "train/cross_entropy": TRAIN_CE[i],
            "epoch": i // 6,
            "trainer/global_step": step,
        }
        if step in EVAL_STEPS:
            j = EVAL_STEPS.index(step)
            row |= {
                "val/perplexity": VAL_PPL[j],
                "kpi/pass_rate": PASS_RATE[j],
                "kpi/pass_rate/seconds": 0.125,
                "kpi/speedup": SPEEDUP[j],
            }
        run.log(row)
    return finish_run(run, root)


@pytest.fixture(scope="module")
def run_file(run_dir: Path) -> Path:
    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return file


@pytest.fixture(scope="module")
def truncated(run_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the run file cut inside a record amid its history, as if the writer was killed."""
    cut = tmp_path_factory.mktemp("cut") / run_file.name
    data = run_file.read_bytes()
    # Half way is amid the history; the other fractions only guard against a layout change.
    for fraction in (0.5, 0.45, 0.55, 0.4, 0.6):
        cut.write_bytes(data[: int(len(data) * fraction)])
        run = read_run(cut)
        if 1 < len(run.history) < len(STEPS) and "truncated" in run.errors[0]:
            return cut
    raise AssertionError("no cut of the run file ends inside a history record")


def _row(text: str, key: str) -> str:
    lines = [line for line in text.splitlines() if line.split()[:1] == [key]]
    assert len(lines) == 1, f"no single row for {key} in:\n{text}"
    return lines[0]


def _cells(line: str) -> list[str]:
    # key, first, last, best, points: columns are separated by two spaces or more.
    return re.split(r"\s{2,}", line.strip())


def _check_table(text: str, run_file: Path) -> None:
    run_id = run_file.stem.removeprefix("run-")
    header = text.split("\n\n", 1)[0]
    assert f"run {run_id}" in header
    assert f"project {PROJECT}" in header and "name cli-run" in header
    assert str(run_file.name) in header
    assert "12 history rows" in header and "last step 120" in header
    assert "finished (exit code 0)" in header and "resumed" not in header

    expected = {
        "train/cross_entropy": ["4.5 @ 10", "1.75 @ 120", "1.75 @ 120 (min?)", "12"],
        "train/perplexity": ["64 @ 10", "5.5 @ 120", "5.5 @ 120 (min)", "12"],
        "val/perplexity": ["20 @ 40", "13.25 @ 120", "12.5 @ 80 (min)", "3"],
        "kpi/pass_rate": ["0.25 @ 40", "0.5 @ 120", "0.75 @ 80 (max)", "3"],
        "kpi/speedup": ["1.125 @ 40", "1.75 @ 120", "1.75 @ 120 (max?)", "3"],
    }
    for key, cells in expected.items():
        assert _cells(_row(text, key)) == [key, *cells]
    # Model metrics first (train before val, each by name), then KPIs; no bookkeeping keys.
    lines = text.splitlines()
    order = [lines.index(_row(text, key)) for key in expected]
    assert order == sorted(order)
    assert lines.index("model metrics") < order[0] < order[2] < lines.index("business KPIs")
    for key in ("kpi/pass_rate/seconds", "epoch", "trainer/global_step", "_step", "_runtime"):
        assert not any(line.split()[:1] == [key] for line in lines), key
    assert "(min?)/(max?): direction guessed from the key's name" in text
    assert "read errors" not in text


def _check_json(data: dict, run_file: Path) -> None:
    assert data["run"] == {
        "id": run_file.stem.removeprefix("run-"),
        "project": PROJECT,
        "name": "cli-run",
        "path": str(run_file),
        "history_rows": 12,
        "step_key": "trainer/global_step",
        "last_step": 120,
        "state": "finished",
        "complete": True,
        "exit_code": 0,
        "parts": [],
    }
    assert data["errors"] == []
    metrics = {m["key"]: m for m in data["metrics"]}
    assert list(metrics) == [
        "train/cross_entropy",
        "train/perplexity",
        "val/perplexity",
        "kpi/pass_rate",
        "kpi/speedup",
    ]
    assert metrics["val/perplexity"] == {
        "key": "val/perplexity",
        "group": "model",
        "first": {"step": 40, "value": VAL_PPL[0]},
        "last": {"step": 120, "value": VAL_PPL[-1]},
        "best": {"step": 80, "value": min(VAL_PPL)},
        "direction": "min",
        "direction_from": "define_metric",
        "summary": None,
        "points": 3,
    }
    assert metrics["kpi/pass_rate"]["group"] == "business"
    assert metrics["kpi/pass_rate"]["best"] == {"step": 80, "value": max(PASS_RATE)}
    assert metrics["kpi/pass_rate"]["direction"] == "max"
    assert metrics["kpi/speedup"]["direction_from"] == "name"
    assert metrics["train/perplexity"]["first"] == {"step": 10, "value": TRAIN_PPL[0]}
    assert metrics["train/perplexity"]["last"] == {"step": 120, "value": TRAIN_PPL[-1]}


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_table(run_dir: Path, run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The save dir, the run folder and the file itself all name the same run.
    for where in (run_dir, run_file.parent, run_file):
        assert main(["report", str(where)]) == 0
        out, err = capsys.readouterr()
        _check_table(out, run_file)
        assert err == ""


def test_json_matches_the_table(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_file), "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    _check_json(data, run_file)
    assert data["plot"] is None
    assert err == ""


def test_keys_select_rows(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def shown(argv: list[str]) -> list[str]:
        assert main(["report", str(run_file), *argv]) == 0
        out = capsys.readouterr().out
        return [line.split()[0] for line in out.splitlines() if line.startswith("  ")]

    # A plain prefix matches the keys under it; --keys can be repeated.
    assert shown(["--keys", "kpi", "--keys", "val/*"]) == [
        "val/perplexity",
        "kpi/pass_rate",
        "kpi/speedup",
    ]
    # Bookkeeping keys show only when a pattern names them.
    assert shown(["--keys", "*/seconds", "epoch"]) == ["kpi/pass_rate/seconds", "epoch"]

    assert main(["report", str(run_file), "--keys", "nothing/*"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no numeric key matches --keys nothing/*" in err and "train/perplexity" in err


def test_plot_writes_a_png(
    run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "plots" / "curves.png"
    assert main(["report", str(run_file), "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    _check_table(out, run_file)
    assert f"plot written to {png}" in out
    assert err == ""
    _check_png(png)

    # With --json, the path is in the JSON and stdout stays parseable.
    png2 = tmp_path / "kpis.png"
    assert main(["report", str(run_file), "--json", "--plot", str(png2), "--keys", "kpi/*"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plot"] == str(png2)
    assert [m["key"] for m in data["metrics"]] == ["kpi/pass_rate", "kpi/speedup"]
    _check_png(png2)


def test_plot_run_panels(run_file: Path, tmp_path: Path) -> None:
    # The library function the training script reuses: perplexity and KPIs by default.
    run = read_run(run_file)
    out = plot_run(run, tmp_path / "p.png")
    assert out == tmp_path / "p.png"
    _check_png(out)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_run(run, tmp_path / "none.png", keys=["nothing"])


def test_plot_without_matplotlib(
    run_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import fail, as if matplotlib were not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    png = tmp_path / "curves.png"
    assert main(["report", str(run_file), "--plot", str(png)]) == 2
    out, err = capsys.readouterr()
    _check_table(out, run_file)  # the table is printed all the same
    assert 'pip install "lossplug[plot]"' in err
    assert len(err.splitlines()) == 1
    assert not png.exists()


def test_truncated_run(truncated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = read_run(truncated)
    rows = len(expected.history)
    assert 1 < rows < 12 and not expected.complete

    assert main(["report", str(truncated)]) == 1
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith(f"lossplug report: warning: {truncated}: incomplete run: file ends")
    assert "truncated" in line and f"showing the {rows} history rows that could be read" in line
    # The partial table: what was read before the cut, with its real steps.
    assert "UNFINISHED (no exit record" in out and f"{rows} history rows" in out
    last = expected.series("train/perplexity")[-1]
    assert _cells(_row(out, "train/perplexity"))[:3] == [
        "train/perplexity",
        "64 @ 10",
        f"{last[1]:g} @ {last[0]}",
    ]
    assert _cells(_row(out, "train/perplexity"))[-1] == str(rows)
    assert "read errors:" in out and "no exit record" in out

    assert main(["report", str(truncated), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["complete"] is False and data["run"]["history_rows"] == rows
    assert data["run"]["state"] == "unfinished"
    assert data["errors"] == expected.errors
    assert {m["key"]: m for m in data["metrics"]}["train/perplexity"]["points"] == rows


def test_nothing_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "run"
    assert main(["report", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"lossplug report: error: no such file or folder: {missing}\n"

    assert main(["report", str(tmp_path)]) == 2  # a folder with no run in it
    assert "no W&B run under" in capsys.readouterr().err

    header_only = tmp_path / "run-x.wandb"
    header_only.write_bytes(b":W&B\xe1\xbe\x00" + b"\x01" * 100)  # a header, then noise
    assert main(["report", str(header_only)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no W&B record could be read" in err


def test_bad_arguments(run_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["report"], ["report", str(run_file), "--wait", "-1"], ["frobnicate"]):
        assert main(argv) == 2, argv
        assert "usage: lossplug" in capsys.readouterr().err
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--plot FILE.png" in out and "exit codes:" in out


def test_summarize_matches_the_log(run_file: Path) -> None:
    rows = {row.key: row for row in summarize(read_run(run_file))}
    val = rows["val/perplexity"]
    assert [(p.step, p.value) for p in (val.first, val.last, val.best)] == [
        (40, 20.0),
        (120, 13.25),
        (80, 12.5),
    ]
    assert (val.direction, val.direction_from, val.points) == ("min", "define_metric", 3)
    assert (rows["kpi/speedup"].direction, rows["kpi/speedup"].direction_from) == ("max", "name")


def test_subprocesses(run_dir: Path, run_file: Path, tmp_path: Path) -> None:
    """The real command lines: no traceback, the right exit codes, the same output."""
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    module = [sys.executable, "-m", "lossplug.cli"]
    # The console script that `pip install` puts beside the interpreter, when it is there.
    script = shutil.which("lossplug", path=str(Path(sys.executable).parent))
    command = [script] if script else module
    garbage = tmp_path / "run-garbage.wandb"
    garbage.write_bytes(bytes(range(256)) * 8)
    calls = {
        "table": [*module, "report", str(run_dir)],
        "json": [*command, "report", str(run_file), "--json"],
        "garbage": [*module, "report", str(garbage)],
    }
    # Started together: each pays the interpreter's and torch's import time once, in parallel.
    procs = {
        name: subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
        )
        for name, argv in calls.items()
    }
    results = {name: (p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    for name, ((_, err), _) in results.items():
        assert "Traceback" not in err, (name, err)

    (out, err), code = results["table"]
    assert code == 0, err
    _check_table(out, run_file)

    (out, err), code = results["json"]
    assert code == 0, err
    _check_json(json.loads(out), run_file)

    (out, err), code = results["garbage"]
    assert code == 2 and out == ""
    assert err == (
        f"lossplug report: error: {garbage} is not a W&B run file: "
        "it does not start with the b':W&B' header\n"
    )
