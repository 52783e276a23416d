"""How a run ended, resumed runs and ``summary="last"`` metrics, read back and reported.

Every run here is written by wandb itself (offline, in temporary folders): a crashed run
(``run.finish(exit_code=1)``), one cut right before its exit record (as a still-running or killed
run's file ends), and runs resumed with ``wandb.init(id=..., resume="allow")`` whose parts are
separate run folders, plain and under a real Lightning ``Trainer`` resumed from a checkpoint.
Each is read back with ``read_run`` and reported through ``lossplug report`` (``main([...])``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from lossplug.cli import EXIT_CRASHED, EXIT_INCOMPLETE, EXIT_OK, main
from lossplug.loggers import NO_EXIT, NOT_READ, read_run
from lossplug.report import summarize

PROJECT = "lossplug-states"
TOKENS = [512, 1024, 1536, 2048]  # a counter: its highest value is merely its last
COST = [0.25, 0.5, 0.75, 1.0]  # a running total: its lowest value is merely its first
LOSS = [4.0, 3.0, 3.5, 2.5]
# Resumed run: part 1 logs steps 1-5 and crashes; part 2 restarts from the checkpoint at step 3
# and logs steps 4-7 again with other values. val/loss at step 5 is logged by part 1 only.
PART1 = {1: 4.0, 2: 3.5, 3: 3.25, 4: 3.0, 5: 2.875}
PART2 = {4: 2.75, 5: 2.5, 6: 2.25, 7: 2.0}
VAL1 = {5: 3.125}
VAL2 = {7: 2.5}


def _row(text: str, key: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.split()[:1] == [key]]
    assert len(lines) == 1, f"no single row for {key} in:\n{text}"
    # key, first, last, best, points: columns are separated by two spaces or more.
    return re.split(r"\s{2,}", lines[0].strip())


def _file_of(run) -> Path:
    return Path(run.dir).parent / f"run-{run.id}.wandb"


def _finish(run, exit_code: int = 0) -> Path:
    file = _file_of(run)
    run.finish(exit_code=exit_code)
    # finish() can return before wandb's writer has flushed the file: wait for the exit record.
    assert read_run(file, wait=30).complete
    return file


def _next_second() -> None:
    # A part's folder is named after the second it started in: one second, one folder.
    time.sleep(1.01 - time.time() % 1)


def _log_counters(root: Path, name: str, exit_code: int) -> Path:
    import wandb

    run = wandb.init(mode="offline", dir=root, project=PROJECT, name=name)
    for key in ("train/tokens", "kpi/cost/total"):
        run.define_metric(key, summary="last")
    run.define_metric("train/loss", summary="min")
    for tokens, cost, loss in zip(TOKENS, COST, LOSS, strict=True):
        run.log({"train/tokens": tokens, "kpi/cost/total": cost, "train/loss": loss})
    return _finish(run, exit_code)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The save dir of a run that ended with exit code 1 (as when the script raises)."""
    root = tmp_path_factory.mktemp("crashed")
    _log_counters(root, "crashy", exit_code=1)
    return root


@pytest.fixture(scope="module")
def finished_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _log_counters(tmp_path_factory.mktemp("finished"), "fine", exit_code=0)


def _without_exit(file: Path) -> bytes:
    """The file's bytes up to its exit record, cut at that record's first byte: what a run
    that is still running, or was killed, leaves on disk (no damage, only no end)."""
    from wandb.proto import wandb_internal_pb2

    from lossplug.loggers.run_reader._records import iter_payloads

    for offset, payload in iter_payloads(file, []):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "exit":
            return file.read_bytes()[:offset]
    raise AssertionError(f"{file} has no exit record")


@pytest.fixture(scope="module")
def unfinished(finished_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of a finished run's file without its exit record."""
    cut = tmp_path_factory.mktemp("unfinished") / finished_file.name
    cut.write_bytes(_without_exit(finished_file))
    return cut


def _resumed_part(root: Path, loss: dict, val: dict, exit_code: int, define_val: bool) -> Path:
    import wandb

    run = wandb.init(
        mode="offline", dir=root, project=PROJECT, name="resumed", id="resumeme", resume="allow"
    )
    run.define_metric("trainer/global_step")
    run.define_metric("train/loss", step_metric="trainer/global_step", summary="min")
    run.define_metric("train/tokens", step_metric="trainer/global_step", summary="last")
    if define_val:  # only the second process knows val/loss
        run.define_metric("val/loss", step_metric="trainer/global_step", summary="min")
    for step, value in loss.items():
        run.log({"train/loss": value, "train/tokens": 100 * step, "trainer/global_step": step})
        if step in val:  # a separate row at the same step, as Lightning's validation logs
            run.log({"val/loss": val[step], "trainer/global_step": step})
    return _finish(run, exit_code)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run that crashed after step 5 and was resumed (same id, a second run folder)."""
    root = tmp_path_factory.mktemp("resumed")
    first = _resumed_part(root, PART1, VAL1, exit_code=1, define_val=False)
    _next_second()
    second = _resumed_part(root, PART2, VAL2, exit_code=0, define_val=True)
    assert first.parent != second.parent and first.name == second.name
    return {"root": root, "parts": [first, second]}


# --- how the run ended -----------------------------------------------------------------------


def test_crashed_run_says_so_and_exits_3(crashed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = read_run(crashed)
    assert (run.state, run.complete, run.exit_code, run.errors) == ("crashed", True, 1, [])

    assert main(["report", str(crashed)]) == EXIT_CRASHED == 3
    out, err = capsys.readouterr()
    header = out.split("\n\n", 1)[0]
    assert "CRASHED (exit code 1)" in header and "complete" not in header
    assert err == (
        f"lossplug report: warning: {run.path}: the run crashed (exit code 1); "
        "showing the 4 history rows it logged\n"
    )
    assert _row(out, "train/loss") == ["train/loss", "4 @ 0", "2.5 @ 3", "2.5 @ 3 (min)", "4"]

    assert main(["report", str(crashed), "--json"]) == EXIT_CRASHED
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["state"] == "crashed" and data["run"]["exit_code"] == 1
    assert data["run"]["complete"] is True and data["run"]["parts"] == []


def test_finished_run_exits_0(finished_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert read_run(finished_file).state == "finished"
    assert main(["report", str(finished_file)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "finished (exit code 0)" in out.split("\n\n", 1)[0] and err == ""
    assert main(["report", str(finished_file), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["run"]["state"] == "finished"


def test_run_without_exit_record_is_unfinished(
    unfinished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = read_run(unfinished)
    assert run.state == "unfinished" and run.exit_code is None and len(run.history) == 4
    # Cut at a record boundary: nothing is damaged, only the end is missing.
    assert len(run.errors) == 1 and "no exit record" in run.errors[0]
    assert "crashed" not in run.errors[0] and "still running or killed" in run.errors[0]
    assert (run.errors[0].kind, run.errors[0].file) == (NO_EXIT, unfinished.name)

    assert main(["report", str(unfinished)]) == EXIT_INCOMPLETE
    out, err = capsys.readouterr()
    assert "UNFINISHED (no exit record: still running or killed)" in out.split("\n\n", 1)[0]
    assert err == (
        f"lossplug report: warning: {unfinished}: the run has not finished (no exit record: "
        "still running or killed); showing the 4 history rows written so far\n"
    )
    assert main(["report", str(unfinished), "--json"]) == EXIT_INCOMPLETE
    data = json.loads(capsys.readouterr().out)
    assert (data["run"]["state"], data["run"]["exit_code"]) == ("unfinished", None)


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--help"]) == 0
    epilog = capsys.readouterr().out.split("exit codes:", 1)[1]
    for code, words in ((0, "finished"), (1, "no exit record"), (2, "nothing"), (3, "crashed")):
        assert re.search(rf"^  {code}  .*{words}", epilog, re.MULTILINE), code


# --- summary="last": totals and counters -----------------------------------------------------


def test_last_summary_metrics_have_no_best(
    crashed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = read_run(crashed)
    # W&B itself kept only the last value of each, and the definitions read back say so.
    assert run.summary["train/tokens"] == {"last": TOKENS[-1]}
    assert run.summary["kpi/cost/total"] == {"last": COST[-1]}
    assert run.metrics["train/tokens"].summary == ("last",)

    rows = {row.key: row for row in summarize(run)}
    for key, values in (("train/tokens", TOKENS), ("kpi/cost/total", COST)):
        row = rows[key]
        # By name alone, tokens would be "max" and cost "min": the definition wins.
        assert (row.best, row.direction, row.direction_from) == (None, None, "define_metric")
        assert (row.summary, row.last.value, row.points) == ("last", values[-1], len(values))
    assert rows["train/loss"].summary is None and rows["train/loss"].best.value == min(LOSS)

    main(["report", str(crashed)])
    out = capsys.readouterr().out
    assert _row(out, "train/tokens") == ["train/tokens", "512 @ 0", "2048 @ 3", "- (last)", "4"]
    assert _row(out, "kpi/cost/total") == ["kpi/cost/total", "0.25 @ 0", "1 @ 3", "- (last)", "4"]
    assert '(last): a total or counter (define_metric summary="last"): no best' in out

    main(["report", str(crashed), "--json"])
    metrics = {m["key"]: m for m in json.loads(capsys.readouterr().out)["metrics"]}
    assert metrics["train/tokens"]["best"] is None
    assert metrics["train/tokens"]["summary"] == "last"
    assert metrics["train/tokens"]["last"] == {"step": 3, "value": TOKENS[-1]}
    assert metrics["train/loss"]["summary"] is None


def test_last_summary_through_a_glob(tmp_path: Path) -> None:
    """A glob definition (kpi/cost/*) covers every key under it; an exact one still wins."""
    import wandb

    run = wandb.init(mode="offline", dir=tmp_path, project=PROJECT)
    run.define_metric("kpi/cost/*", summary="last")
    run.define_metric("kpi/cost/per_token", summary="min")
    for i in range(3):
        run.log({"kpi/cost/total": 0.5 * (i + 1), "kpi/cost/per_token": 1.0 / (i + 2)})
    _finish(run)

    rows = {row.key: row for row in summarize(read_run(tmp_path))}
    assert (rows["kpi/cost/total"].summary, rows["kpi/cost/total"].best) == ("last", None)
    assert rows["kpi/cost/per_token"].summary is None
    assert rows["kpi/cost/per_token"].best.value == 0.25


# --- resumed runs ------------------------------------------------------------------------------


def test_resumed_run_is_read_whole(resumed: dict) -> None:
    first, second = (read_run(file) for file in resumed["parts"])
    assert (first.state, second.state) == ("crashed", "finished")

    run = read_run(resumed["root"])

    assert run.path.resolve() == second.path.resolve() and run.run_id == "resumeme"
    assert [part.path.resolve() for part in run.parts] == [first.path, second.path]
    assert (run.state, run.exit_code, run.errors) == ("finished", 0, [])
    # Each step once, the resumed process winning where both logged; in step order.
    assert run.series("train/loss") == sorted((PART1 | PART2).items())
    assert run.series("train/tokens") == [(s, 100 * s) for s in sorted(PART1 | PART2)]
    # val/loss at step 5 was logged by the first process only: it is kept.
    assert run.series("val/loss") == sorted((VAL1 | VAL2).items())
    steps = [row["trainer/global_step"] for row in run.history]
    assert steps == sorted(steps)
    # wandb counted _step from 0 again in the second part: numbered on, as W&B online would.
    # Part 1 wrote _step 0-5 (its train rows at steps 4 and 5, _step 3 and 4, were logged
    # again), part 2 0-4, now 6-10.
    assert sorted(row["_step"] for row in run.history) == [0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert run.summary["_step"] == 10
    # The summary is the last part's; definitions from both parts.
    assert run.summary["train/loss"] == {"min": min(PART2.values())}
    assert run.summary["train/tokens"] == {"last": 100 * max(PART2)}
    assert run.metrics["val/loss"].summary == ("min",) and "val/loss" not in first.metrics
    assert run.metrics["train/tokens"].summary == ("last",)


def test_every_folder_form_reads_every_part(resumed: dict) -> None:
    root, (first, second) = resumed["root"], resumed["parts"]
    whole = read_run(root).history
    for form in (root, root / "wandb", root / "wandb" / "latest-run", first.parent, second.parent):
        run = read_run(form)
        assert len(run.parts) == 2 and run.history == whole, form
        assert run.path.resolve() == second.resolve()
    # A .wandb file is read alone: that is how to look at one part.
    alone = read_run(first)
    assert alone.parts == [] and alone.series("train/loss") == sorted(PART1.items())


def test_report_on_a_resumed_run(resumed: dict, capsys: pytest.CaptureFixture[str]) -> None:
    first = resumed["parts"][0]
    merged = PART1 | PART2
    assert main(["report", str(resumed["root"])]) == EXIT_OK
    out, err = capsys.readouterr()
    assert err == ""
    header = out.split("\n\n", 1)[0]
    assert f"{len(merged) + len(VAL1 | VAL2)} history rows  last step 7" in header
    assert "finished (exit code 0)" in header and "resumed: 2 parts" in header
    assert re.search(
        rf"part 1: {re.escape(str(first))}  6 history rows  CRASHED \(exit code 1\)", header
    )
    assert re.search(
        r"part 2: .*run-resumeme\.wandb  5 history rows  finished \(exit code 0\)", header
    )
    best = min(merged.values())
    assert _row(out, "train/loss") == [
        "train/loss", "4 @ 1", f"{merged[7]:g} @ 7", f"{best:g} @ 7 (min)", str(len(merged))
    ]  # fmt: skip
    assert _row(out, "train/tokens")[3:] == ["- (last)", str(len(merged))]
    assert _row(out, "val/loss") == ["val/loss", "3.125 @ 5", "2.5 @ 7", "2.5 @ 7 (min)", "2"]

    assert main(["report", str(resumed["root"]), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)["run"]
    assert data["state"] == "finished" and data["history_rows"] == len(merged) + 2
    assert [(p["state"], p["exit_code"], p["history_rows"]) for p in data["parts"]] == [
        ("crashed", 1, 6),
        ("finished", 0, 5),
    ]

    # Reporting one part's file alone says that part crashed.
    assert main(["report", str(first)]) == EXIT_CRASHED
    assert "CRASHED (exit code 1)" in capsys.readouterr().out


def test_resumed_run_without_a_step_key(tmp_path: Path) -> None:
    """A plain run counts only W&B's _step, from 0 in each offline part: the parts follow on."""
    import wandb

    values = [[1.0, 0.75, 0.5], [0.375, 0.25]]
    for i, part in enumerate(values):
        if i:
            _next_second()
        run = wandb.init(mode="offline", dir=tmp_path, project=PROJECT, id="plain", resume="allow")
        for value in part:
            run.log({"loss": value})
        _finish(run)

    run = read_run(tmp_path)
    assert run.step_key() == "_step" and len(run.parts) == 2
    assert run.series("loss") == list(enumerate(values[0] + values[1]))


def test_an_earlier_part_killed_before_its_end(
    resumed: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed process leaves a part without its exit record: the resumed run is still whole."""

    for file in resumed["parts"]:
        shutil.copytree(file.parent, tmp_path / "wandb" / file.parent.name)
    first = tmp_path / "wandb" / resumed["parts"][0].parent.name / resumed["parts"][0].name
    first.write_bytes(_without_exit(first))
    assert read_run(first).state == "unfinished"

    run = read_run(tmp_path)
    assert run.state == "finished" and run.errors == []
    assert run.parts[0].state == "unfinished"
    assert run.series("train/loss") == sorted((PART1 | PART2).items())
    assert main(["report", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"part 1: .*UNFINISHED \(no exit record: still running or killed\)", out)


def test_a_last_part_without_its_end_keeps_the_kind(resumed: dict, tmp_path: Path) -> None:
    """Merging renames a part's problems after its folder; what kind each is stays."""
    for file in resumed["parts"]:
        shutil.copytree(file.parent, tmp_path / "wandb" / file.parent.name)
    last = tmp_path / "wandb" / resumed["parts"][1].parent.name / resumed["parts"][1].name
    last.write_bytes(_without_exit(last))

    run = read_run(tmp_path)

    assert run.state == "unfinished"
    (error,) = run.errors
    assert (error.kind, error.file) == (NO_EXIT, f"{last.parent.name}/{last.name}")
    assert error == f"{error.file}: {error.detail}" and error.detail.startswith("no exit record")


@pytest.mark.parametrize("which", [0, 1])
def test_an_unreadable_part_is_named(
    resumed: dict, tmp_path: Path, which: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty part: a process killed before wandb wrote anything, or one that just started."""
    for file in resumed["parts"]:
        shutil.copytree(file.parent, tmp_path / "wandb" / file.parent.name)
    files = [tmp_path / "wandb" / file.parent.name / file.name for file in resumed["parts"]]
    files[which].write_bytes(b"")
    other = read_run(files[1 - which])

    run = read_run(tmp_path)

    assert [part.path for part in run.parts] == files
    assert run.parts[which].history == [] and run.parts[which].state == "unfinished"
    assert run.series("train/loss") == other.series("train/loss")
    (error,) = run.errors
    assert error.startswith(f"{files[which].parent.name}/{files[which].name}: part not read")
    assert "empty" in error
    assert (error.kind, error.file) == (NOT_READ, f"{files[which].parent.name}/{files[which].name}")
    # A last part not yet written: the run is running again, whatever the first part's end.
    assert run.state == ("unfinished" if which == 1 else "finished")
    assert main(["report", str(tmp_path)]) == EXIT_INCOMPLETE
    out, err = capsys.readouterr()
    assert "part not read" in err and f"part {which + 1}: {files[which]}  0 history rows" in out

    files[1 - which].write_bytes(b"")  # no part readable: the same error as for one file
    with pytest.raises(ValueError, match="the file is empty"):
        read_run(tmp_path)


def test_lightning_run_resumed_from_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """WandbLogger(id=..., resume="allow"): a Trainer stopped at step 5, resumed from step 3."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.data import DataLoader, TensorDataset

    logged: dict[int, float] = {}

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train/loss", loss)
            logged[self.global_step] = float(loss.detach())  # the later process overwrites
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 2), torch.randn(32, 1)), batch_size=2)
    ckpt = tmp_path / "ckpt"
    files = []
    for max_steps, resume_from in ((5, None), (8, ckpt / "epoch=0-step=3.ckpt")):
        if resume_from is not None:
            _next_second()
        logger = WandbLogger(
            project=PROJECT, save_dir=tmp_path, offline=True, id="lit", resume="allow"
        )
        trainer = pl.Trainer(
            max_steps=max_steps,
            logger=logger,
            log_every_n_steps=1,
            accelerator="cpu",
            callbacks=[pl.callbacks.ModelCheckpoint(ckpt, every_n_train_steps=3, save_top_k=-1)],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Tiny(), data, ckpt_path=resume_from)
        files.append(_finish(logger.experiment))
    assert files[0].parent != files[1].parent

    run = read_run(tmp_path)
    assert len(run.parts) == 2 and run.state == "finished" and run.errors == []
    # Steps 3 and 4 were logged by both processes: once each, with the resumed values.
    assert run.series("train/loss") == sorted(logged.items())
    assert [s for s, _ in run.series("train/loss")] == list(range(8))

    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    (row,) = [m for m in json.loads(capsys.readouterr().out)["metrics"] if m["key"] == "train/loss"]
    assert row["points"] == 8 and row["last"] == {"step": 7, "value": logged[7]}
