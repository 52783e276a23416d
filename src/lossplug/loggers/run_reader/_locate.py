"""Where a run's files are: the ``.wandb`` file a path names, and the parts of a resumed run.

An offline run (and the local copy of an online one) lives in
``<save_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`` (``run-<time>-<id>/`` when online),
its logged media in the ``files/`` folder beside that file. A resumed run is written in parts:
one run folder, and one ``.wandb`` file, per process, all with the same run id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["find_run_file", "find_runs", "part_name", "run_parts"]

# Run folder names: "run-20240101_120000-abc123" online, "offline-run-..." offline.
_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def find_run_file(path: Path) -> Path:
    """The ``.wandb`` file ``path`` names: itself, the one in a run folder, or the latest run's.

    The latest run of a ``wandb/`` folder (or of the save dir holding it) is the one
    ``wandb/latest-run`` points to, else the newest by the time in its folder name, then by
    its file's modification time.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no W&B run.
    """
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return path
    file = _run_file(path)
    if file is not None:
        return file
    wandb_dir = path / "wandb" if (path / "wandb").is_dir() else path
    latest = wandb_dir / "latest-run"
    file = _run_file(latest) if latest.is_dir() else None
    if file is not None:
        return file
    runs = []
    for run_dir in wandb_dir.iterdir():
        match = _RUN_DIR.match(run_dir.name)
        if match and run_dir.is_dir():
            for file in run_dir.glob("run-*.wandb"):
                runs.append((match.group(1), file.stat().st_mtime, file))
    if not runs:
        raise FileNotFoundError(
            f"no W&B run under {path}: expected a run-*.wandb file, a run folder "
            "(offline-run-* or run-*), or a folder holding wandb/"
        )
    return max(runs, key=lambda r: r[:2])[2]


def _run_file(folder: Path) -> Path | None:
    """The ``run-*.wandb`` file in ``folder``, if any."""
    files = sorted(folder.glob("run-*.wandb"))
    # One per run folder; several only if something copied files around: take the newest.
    return max(files, key=lambda f: f.stat().st_mtime) if files else None


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """Where each run at or under ``path`` is, one path per run, for :func:`read_run`.

    A path that names a run itself (a ``.wandb`` file, a run folder, a ``wandb/`` folder or the
    save dir holding one) gives just that path, whatever else lies below it. Any other folder
    is searched (hidden folders and run folders' contents left out): each run id of each
    ``wandb/`` folder found is one run, named by its newest run folder (which :func:`read_run`
    reads with the run's earlier parts), in order of the folders' paths.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no run at any depth.

    Example:
        ``find_runs("sweeps")`` for ``sweeps/lr-1e-3/wandb/offline-run-…-a1/`` and
        ``sweeps/lr-3e-3/wandb/offline-run-…-b2/`` gives both run folders.
    """
    path = Path(path)
    try:
        find_run_file(path)
    except FileNotFoundError:
        found = _runs_below(path) if path.is_dir() else []
        if not found:
            raise
        return found
    return [path]


def _runs_below(path: Path) -> list[Path]:
    found = []
    for wandb_dir in sorted(_wandb_dirs(path)):
        newest: dict[str, tuple[str, Path]] = {}
        for started, run_id, folder in _part_folders(wandb_dir):
            newest[run_id] = max(newest.get(run_id, (started, folder)), (started, folder))
        found += [folder for _, folder in sorted(newest.values())]
    return found


def _wandb_dirs(folder: Path) -> list[Path]:
    """The ``wandb/`` folders below ``folder``, not looking inside them or hidden folders."""
    out = []
    for child in folder.iterdir():
        if not child.is_dir() or child.name.startswith(".") or child.is_symlink():
            continue
        out += [child] if child.name == "wandb" else _wandb_dirs(child)
    return out


def _part_folders(wandb_dir: Path) -> list[tuple[str, str, Path]]:
    """``(start time, run id, folder)`` of each run folder in ``wandb_dir``, links left out."""
    found = []
    for folder in wandb_dir.iterdir():
        match = _RUN_DIR.match(folder.name)
        if match and folder.is_dir() and not folder.is_symlink():
            started, run_id = match.groups()
            found.append((started, run_id, folder))
    return found


def run_parts(file: Path) -> list[Path]:
    """The ``.wandb`` files of every part of ``file``'s run, oldest first, ``file`` among them."""
    real = file.parent.resolve()  # wandb/latest-run is a link to the run folder
    match = _RUN_DIR.match(real.name)
    if not match:
        return [file]
    # Name the other parts beside the folder as the user named it (wandb/latest-run/.. is wandb/).
    base = file.parent.parent
    if not (base / real.name).is_dir() or (base / real.name).resolve() != real:
        base = real.parent
    files = []
    # A part's folder is unique to its start second: sorting them puts the oldest first.
    for _, run_id, folder in sorted(_part_folders(real.parent)):
        if run_id != match.group(2):
            continue
        part = file if folder.name == real.name else _run_file(base / folder.name)
        if part is not None:  # a folder left without its file (deleted, or never written)
            files.append(part)
    return files


def part_name(file: Path) -> str:
    """``"<run folder>/<file name>"``: every part's file is ``run-<id>.wandb``, its folder
    tells them apart."""
    return f"{file.parent.resolve().name}/{file.name}"
