"""lossplug.loggers: the offline-by-default W&B logger and the ``.wandb`` file reader.

Runs are real: written by wandb itself (offline, in temporary folders), once directly, once
with a table and custom charts, and once through ``wandb_logger`` under a small Lightning
``Trainer``, then read back with ``read_run``.
Mode detection is tested through the pure ``resolve_mode``; nothing here goes online.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from lossplug.loggers import (
    DAMAGED,
    NO_EXIT,
    MetricDefinition,
    ReadProblem,
    api_key_source,
    describe_run,
    read_run,
    resolve_mode,
    wandb_logger,
)

LOSSES = [0.9, 0.7, 0.8, 0.5]
ACCS = [0.25, 0.5, 0.75, 1.0]
BLOB = "x" * 70_000  # a config value large enough to span three 32 KiB blocks
# A table of the kind the callbacks log at the end of fit, logged twice: the last one counts.
TABLE_COLUMNS = ["step", "val/perplexity", "kpi/exact_match"]
TABLES = [
    [[1, 12.5, 0.25], [2, 10.0, 0.5]],
    [[1, 12.5, 0.25], [2, 10.0, 0.5], [3, 9.0, float("nan")]],
]
AUTH_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC")


def _no_credentials(mp: pytest.MonkeyPatch, home: Path) -> None:
    for var in (*AUTH_VARS, "RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        mp.delenv(var, raising=False)
    mp.setenv("HOME", str(home))


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run written with wandb.init(mode="offline"), the way a plain PyTorch user would."""
    import wandb

    root = tmp_path_factory.mktemp("direct")
    run = wandb.init(
        mode="offline", dir=root, project="lossplug-test", config={"lr": 0.1, "blob": BLOB}
    )
    run.define_metric("epoch")
    run.define_metric("loss", summary="min,max")
    run.define_metric("acc", step_metric="epoch")
    for i, (loss, acc) in enumerate(zip(LOSSES, ACCS, strict=True)):
        run.log({"loss": loss, "acc": acc, "epoch": i, "nested": {"a": {"b": i}}})
    run.log({"odd": float("nan")})
    run.config.update({"late": "yes"})
    run.summary["note"] = "done"
    run.finish()
    # finish() can return before wandb's writer has flushed the file: wait for the exit record.
    assert read_run(root, wait=30).complete
    return root


@pytest.fixture(scope="module")
def media_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that logs a table and two scatter charts of it, twice."""
    import wandb

    root = tmp_path_factory.mktemp("media")
    run = wandb.init(mode="offline", dir=root, project="lossplug-test")
    for rows in TABLES:
        table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
        title = "exact match vs perplexity"
        run.log(
            {
                "link/table": table,
                "link/kpi_exact_match": wandb.plot.scatter(
                    table, "val/perplexity", "kpi/exact_match", title=title
                ),
                "link/split": wandb.plot.scatter(table, "step", "val/perplexity", split_table=True),
            }
        )
    run.finish()
    assert read_run(root, wait=30).complete
    return root


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run written through wandb_logger by a real Lightning Trainer on CPU."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.05, "width": 2})
            self.layer = torch.nn.Linear(2, 1)
            self.logged: list[tuple[int, float, float]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            double = 2.0 * float(loss.detach())
            self.log("train/loss", loss)
            self.log("train/double", double)
            self.logged.append((self.global_step, float(loss.detach()), double))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 2), torch.randn(16, 1))
    with pytest.MonkeyPatch.context() as mp:
        _no_credentials(mp, root)  # not logged in: wandb_logger must pick offline by itself
        logger = wandb_logger("lossplug-test", save_dir=root / "logs", config={"seed": 0})
        assert logger._wandb_init["mode"] == "offline"
        logger.experiment.define_metric("train/double", summary="min,max")
        model = Tiny()
        trainer = pl.Trainer(
            max_steps=6,
            logger=logger,
            log_every_n_steps=1,
            accelerator="cpu",
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=2))
        location = describe_run(logger)
        logger.experiment.finish()  # Lightning leaves the run open after fit
    assert read_run(root / "logs", wait=30).complete
    return {"root": root, "model": model, "location": location}


# --- reading runs written by wandb -------------------------------------------------------------


def test_direct_run_reads_back_exactly(direct_run: Path) -> None:
    run = read_run(direct_run)

    assert run.complete and run.errors == [] and run.exit_code == 0
    assert run.path.name == f"run-{run.run_id}.wandb"
    assert run.project == "lossplug-test"
    assert run.config == {"lr": 0.1, "blob": BLOB, "late": "yes"}

    assert [row["_step"] for row in run.history] == [0, 1, 2, 3, 4]
    assert [row["loss"] for row in run.history[:4]] == LOSSES
    assert [row["nested.a.b"] for row in run.history[:4]] == [0, 1, 2, 3]
    assert math.isnan(run.history[4]["odd"])
    assert run.series("acc") == list(enumerate(ACCS))  # no trainer/global_step: _step is x
    assert run.last("loss") == LOSSES[-1]

    assert run.summary["loss"] == {"min": min(LOSSES), "max": max(LOSSES)}
    assert run.summary["acc"] == ACCS[-1]
    assert run.summary["nested"] == {"a": {"b": 3}}
    assert run.summary["note"] == "done"
    assert run.summary["_step"] == 4

    assert run.metrics["loss"] == MetricDefinition("loss", summary=("min", "max"))
    assert run.metrics["acc"] == MetricDefinition("acc", step_metric="epoch", step_sync=True)
    assert run.metrics["epoch"] == MetricDefinition("epoch")


def test_lightning_run_through_wandb_logger(lightning_run: dict) -> None:
    run = read_run(lightning_run["root"] / "logs")  # the save dir: latest run under wandb/
    logged = lightning_run["model"].logged

    assert run.complete and run.errors == []
    assert [step for step, _, _ in logged] == [0, 1, 2, 3, 4, 5]
    assert run.step_key() == "trainer/global_step"
    # Exact: Lightning logs Python floats, W&B stores their shortest repr.
    assert run.series("train/loss") == [(step, loss) for step, loss, _ in logged]
    assert run.series("train/double") == [(step, double) for step, _, double in logged]
    assert all(row["epoch"] == 0 for row in run.history)

    doubles = [double for _, _, double in logged]
    assert run.summary["train/double"] == {"min": min(doubles), "max": max(doubles)}
    assert run.summary["train/loss"] == logged[-1][1]
    assert run.summary["trainer/global_step"] == 5
    assert run.metrics["*"] == MetricDefinition(
        "*", glob=True, step_metric="trainer/global_step", step_sync=True
    )
    assert run.metrics["train/double"].summary == ("min", "max")
    assert run.config == {"seed": 0, "lr": 0.05, "width": 2}

    location = lightning_run["location"]
    assert location.mode == "offline" and location.run_id == run.run_id
    assert location.run_dir.name.startswith("offline-run-") and location.run_dir.is_dir()
    assert location.sync_command == f"wandb sync {location.run_dir}"
    assert run.path.parent.resolve() == location.run_dir.resolve()


def test_every_path_form_finds_the_run(direct_run: Path) -> None:
    file = read_run(direct_run).path
    for form in (direct_run, direct_run / "wandb", file.parent, file):
        assert read_run(form).path.resolve() == file.resolve()


def test_latest_run_is_picked_by_folder_time(direct_run: Path, tmp_path: Path) -> None:
    file = read_run(direct_run).path
    for stamp, run_id in (("20300101_000000", "newer"), ("20200101_000000", "older")):
        folder = tmp_path / "wandb" / f"offline-run-{stamp}-{run_id}"
        folder.mkdir(parents=True)
        shutil.copy(file, folder / f"run-{run_id}.wandb")
    assert read_run(tmp_path).path.name == "run-newer.wandb"


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.95])
def test_truncated_file_gives_what_was_written(
    direct_run: Path, tmp_path: Path, keep: float
) -> None:
    full = read_run(direct_run)
    data = full.path.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: int(len(data) * keep)])

    run = read_run(cut)

    assert not run.complete
    assert any("truncated" in e or "no exit record" in e for e in run.errors)
    assert len(run.history) <= len(full.history)
    assert run.history == full.history[: len(run.history)]


def test_waiting_for_an_unfinished_run_times_out(direct_run: Path, tmp_path: Path) -> None:
    data = read_run(direct_run).path.read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[:-10])
    start = time.monotonic()
    run = read_run(cut, wait=0.2)
    assert 0.2 <= time.monotonic() - start < 5
    assert not run.complete
    with pytest.raises(ValueError, match="wait must be a number of seconds >= 0, got -1"):
        read_run(cut, wait=-1)


def test_truncated_late_keeps_the_history(lightning_run: dict, tmp_path: Path) -> None:
    full = read_run(lightning_run["root"] / "logs")
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(full.path.read_bytes()[:-10])  # inside the last record (exit)

    run = read_run(cut)

    assert not run.complete and run.errors
    assert run.series("train/loss") == full.series("train/loss")


def test_corrupt_chunk_is_skipped_to_the_next_block(direct_run: Path, tmp_path: Path) -> None:
    data = bytearray(read_run(direct_run).path.read_bytes())
    # The run record (with the 70 kB config) starts in block 0 and ends in block 2: damage its
    # first piece, and the reader must drop the whole record but keep everything after it.
    pos = 7
    while True:
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 2:  # FIRST
            break
        pos += 7 + length
    data[pos + 7 + 100] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))

    run = read_run(bad)

    assert any("CRC mismatch" in e for e in run.errors)
    assert run.complete  # the exit record, after the damage, was still read
    assert "blob" not in run.config and run.config == {"late": "yes"}
    assert [row["loss"] for row in run.history[:4]] == LOSSES


def test_crc_is_plain_crc32_of_type_and_data(direct_run: Path) -> None:
    data = read_run(direct_run).path.read_bytes()
    crc, length, kind = struct.unpack_from("<IHB", data, 7)
    assert crc == zlib.crc32(bytes([kind]) + data[14 : 14 + length])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 definitely a zip file" * 10, "not a W&B run file"),
        (b":W&B\x00\x00\x00" + b"\x00" * 20, "magic number"),
        (b":W&B\xe1\xbe\x07" + b"\x00" * 20, "version 7"),
    ],
)
def test_not_a_wandb_file_raises_a_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "garbage.wandb"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_run(path)
    assert str(path) in str(info.value)


def test_garbage_after_a_valid_header_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "noise.wandb"
    path.write_bytes(b":W&B\xe1\xbe\x00" + bytes(range(256)) * 40)
    run = read_run(path)
    assert not run.complete and run.history == []
    assert any("CRC mismatch" in e or "claims" in e for e in run.errors)


def test_read_problems_say_their_kind_and_file(direct_run: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(read_run(direct_run).path.read_bytes()[:-10])  # inside the exit record

    run = read_run(cut)

    assert all(isinstance(e, ReadProblem) and e.file == "cut.wandb" for e in run.errors)
    assert [e.kind for e in run.errors] == [DAMAGED, NO_EXIT]
    truncated = run.errors[0]
    assert truncated == f"cut.wandb: {truncated.detail}" and "truncated" in truncated.detail
    # Still the plain message wherever it goes.
    copied = pickle.loads(pickle.dumps(truncated))
    assert (copied, copied.kind, copied.file) == (truncated, DAMAGED, "cut.wandb")
    assert json.loads(json.dumps(run.errors)) == [str(e) for e in run.errors]


def test_a_record_that_is_not_protobuf_names_no_file(tmp_path: Path) -> None:
    payload = b"\xff" * 5
    chunk = struct.pack("<IHB", zlib.crc32(bytes([1]) + payload), len(payload), 1) + payload
    path = tmp_path / "odd.wandb"
    path.write_bytes(b":W&B\xe1\xbe\x00" + chunk)

    run = read_run(path)

    assert [(e.kind, e.file) for e in run.errors] == [(DAMAGED, None), (NO_EXIT, "odd.wandb")]
    assert run.errors[0].startswith("record at byte 7: not a valid W&B record")
    assert run.errors[0].detail == run.errors[0]


def test_read_problem_checks_its_kind_and_file() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        ReadProblem("x.wandb: lost", "lost")
    with pytest.raises(ValueError, match="does not begin with 'y\\.wandb'"):
        ReadProblem("x.wandb: lost", DAMAGED, file="y.wandb")


def test_missing_run_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no W&B run"):
        read_run(tmp_path)


# --- tables and charts ----------------------------------------------------------------------


def _same_rows(rows: list[list], expected: list[list]) -> bool:
    # NaN is not equal to itself: compare the cells' reprs.
    return repr(rows) == repr(expected)


def test_logged_table_reads_back_from_the_run_folder(media_run: Path) -> None:
    run = read_run(media_run)
    assert run.complete and run.errors == []
    # The history holds a reference; the table itself is a JSON file in the run's files/.
    value = run.last("link/table")
    assert value["_type"] == "table-file" and value["path"].startswith("media/table/link/")
    assert (run.path.parent / "files" / value["path"]).is_file()
    assert [row["link/table"]["nrows"] for row in run.history] == [len(t) for t in TABLES]

    columns, rows = run.table("link/table")

    assert columns == TABLE_COLUMNS and _same_rows(rows, TABLES[-1])
    assert run.table("link/kpi_exact_match_table") == (columns, rows)  # the chart's copy
    assert run.table("missing") is None and run.table("_step") is None
    assert run.config == {}  # the charts' specs are W&B's bookkeeping, not the user's config


def test_logged_scatter_reads_back_with_its_table(media_run: Path) -> None:
    run = read_run(media_run)

    chart = run.chart("link/kpi_exact_match")

    assert chart.preset == "wandb/scatter/v0" and chart.title == "exact match vs perplexity"
    assert (chart.x, chart.y) == ("val/perplexity", "kpi/exact_match")
    assert chart.table_key == "link/kpi_exact_match_table"
    assert chart.columns == TABLE_COLUMNS and _same_rows(chart.rows, TABLES[-1])
    assert chart.points()[:2] == [(12.5, 0.25), (10.0, 0.5)]

    split = run.chart("link/split")  # split_table=True moves the table to its own section
    assert split.table_key == "Custom Chart Tables/link/split_table" and split.title == ""
    assert split.points() == [(1, 12.5), (2, 10.0), (3, 9.0)]
    assert run.chart("link/table") is None and run.chart("missing") is None


def test_a_table_whose_file_is_gone_raises(media_run: Path, tmp_path: Path) -> None:
    file = read_run(media_run).path
    (tmp_path / file.parent.name).mkdir()
    shutil.copy(file, tmp_path / file.parent.name / file.name)  # without files/
    run = read_run(tmp_path / file.parent.name)
    with pytest.raises(FileNotFoundError, match="table file media/table/link/"):
        run.table("link/table")
    with pytest.raises(FileNotFoundError):
        run.chart("link/kpi_exact_match")


# --- choosing the mode ---------------------------------------------------------------------------


def _netrc(tmp_path: Path, machine: str, password: str = "k" * 40) -> Path:
    path = tmp_path / "netrc"
    path.write_text(f"machine {machine}\n  login user\n  password {password}\n")
    return path


def test_offline_without_a_key(tmp_path: Path) -> None:
    choice = resolve_mode(env={}, netrc_path=tmp_path / "missing")
    assert choice.mode == "offline"
    assert "not logged in" in choice.reason


def test_online_with_an_api_key_variable(tmp_path: Path) -> None:
    choice = resolve_mode(env={"WANDB_API_KEY": "k" * 40}, netrc_path=tmp_path / "missing")
    assert choice == ("online", "logged in: API key from WANDB_API_KEY")


def test_online_with_a_netrc_key_for_the_wandb_host(tmp_path: Path) -> None:
    netrc = _netrc(tmp_path, "api.wandb.ai")
    assert resolve_mode(env={}, netrc_path=netrc).mode == "online"
    assert api_key_source({}, netrc) == str(netrc)


def test_netrc_key_for_another_host_does_not_count(tmp_path: Path) -> None:
    netrc = _netrc(tmp_path, "example.com")
    assert resolve_mode(env={}, netrc_path=netrc).mode == "offline"
    env = {"WANDB_BASE_URL": "https://example.com"}
    assert resolve_mode(env=env, netrc_path=netrc).mode == "online"


def test_netrc_found_through_home_and_netrc_variable(tmp_path: Path) -> None:
    (tmp_path / ".netrc").write_text(_netrc(tmp_path, "api.wandb.ai").read_text())
    assert resolve_mode(env={"HOME": str(tmp_path)}).mode == "online"
    assert resolve_mode(env={"NETRC": str(tmp_path / "netrc")}).mode == "online"
    assert resolve_mode(env={"HOME": str(tmp_path / "empty")}).mode == "offline"


def test_malformed_netrc_means_not_logged_in(tmp_path: Path) -> None:
    bad = tmp_path / "netrc"
    bad.write_text("this is not a netrc file api.wandb.ai\n")
    assert resolve_mode(env={}, netrc_path=bad).mode == "offline"


@pytest.mark.parametrize(
    ("value", "mode"),
    [("offline", "offline"), ("dryrun", "offline"), ("online", "online"), ("run", "online"),
     ("disabled", "disabled"), ("DISABLED", "disabled")],
)  # fmt: skip
def test_wandb_mode_variable_wins(tmp_path: Path, value: str, mode: str) -> None:
    netrc = _netrc(tmp_path, "api.wandb.ai")
    for offline in (None, True, False):
        choice = resolve_mode(offline, env={"WANDB_MODE": value}, netrc_path=netrc)
        assert choice.mode == mode
        assert f"WANDB_MODE={value}" in choice.reason


def test_offline_argument_without_wandb_mode(tmp_path: Path) -> None:
    env = {"WANDB_API_KEY": "k" * 40}
    assert resolve_mode(True, env=env).mode == "offline"
    assert resolve_mode(False, env={}, netrc_path=tmp_path / "missing").mode == "online"


def test_bad_mode_inputs() -> None:
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_mode(env={"WANDB_MODE": "sometimes"})
    with pytest.raises(ValueError, match="WANDB_MODE is set but empty"):
        resolve_mode(env={"WANDB_MODE": " "})
    with pytest.raises(TypeError, match="offline must be True, False or None, got 'yes'"):
        resolve_mode("yes", env={})  # type: ignore[arg-type]


# --- wandb_logger --------------------------------------------------------------------------------


def test_wandb_logger_goes_offline_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_credentials(monkeypatch, tmp_path)
    logger = wandb_logger("proj", save_dir=tmp_path / "out")

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("lossplug: W&B offline (not logged in")
    run_id = logger._wandb_init["id"]
    assert f"offline-run-*-{run_id}" in line and "wandb sync" in line
    assert logger._wandb_init["mode"] == "offline"
    assert "anonymous" not in logger._wandb_init
    assert logger._experiment is None  # nothing started yet
    assert describe_run(logger).mode == "not started"
    assert (tmp_path / "out").is_dir()


def test_wandb_logger_would_go_online_with_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    logger = wandb_logger("proj", save_dir=tmp_path, id="fixedid1")  # never started: no network
    assert logger._wandb_init["mode"] == "online"
    assert logger._wandb_init["id"] == "fixedid1"
    assert "W&B online (logged in: API key from WANDB_API_KEY)" in capsys.readouterr().err


def test_wandb_logger_honours_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_logger(save_dir=tmp_path, verbose=False)._wandb_init["mode"] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger(save_dir=tmp_path, offline=False, verbose=False)
    assert logger._wandb_init["mode"] == "offline"


def test_wandb_logger_prints_on_rank_zero_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("RANK", "1")
    wandb_logger(save_dir=tmp_path)
    assert capsys.readouterr().err == ""


def test_wandb_logger_namespaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch.loggers
    import pytorch_lightning.loggers

    _no_credentials(monkeypatch, tmp_path)
    default = wandb_logger(save_dir=tmp_path, verbose=False)
    classic = wandb_logger(save_dir=tmp_path, namespace="pytorch_lightning", verbose=False)
    unified = wandb_logger(save_dir=tmp_path, namespace="lightning", verbose=False)
    assert type(default) is lightning.pytorch.loggers.WandbLogger
    assert type(unified) is lightning.pytorch.loggers.WandbLogger
    assert type(classic) is pytorch_lightning.loggers.WandbLogger


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"namespace": "keras"}, ValueError, "namespace='keras'"),
        ({"project": "team/proj"}, ValueError, "project='team/proj'"),
        ({"project": ""}, ValueError, "project must not be empty"),
        ({"project": 7}, TypeError, "project must be a str or None, got int"),
        ({"offline": "yes"}, TypeError, "offline must be True, False or None, got 'yes'"),
        ({"save_dir": 3}, TypeError, "save_dir must be a str or path, got int"),
        ({"mode": "offline"}, ValueError, "mode='offline'"),
        ({"dir": "x"}, ValueError, "pass save_dir instead of dir='x'"),
        ({"log_model": True}, ValueError, "log_model=True needs an online run"),
    ],
)
def test_wandb_logger_rejects_bad_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict, error: type, message: str
) -> None:
    _no_credentials(monkeypatch, tmp_path)
    kwargs = {"save_dir": tmp_path, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        wandb_logger(**kwargs)


def test_wandb_logger_rejects_a_file_as_save_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_credentials(monkeypatch, tmp_path)
    file = tmp_path / "file.txt"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        wandb_logger(save_dir=file)
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        wandb_logger(save_dir=tmp_path)


def test_describe_run_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="needs a WandbLogger or a wandb run, got str"):
        describe_run("not a logger")
