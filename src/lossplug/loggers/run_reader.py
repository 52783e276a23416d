"""Read a W&B run back from its local files, with no network and no W&B API call.

An offline run (and the local copy of an online one) lives in
``<save_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`` (``run-<time>-<id>/`` when online).
wandb 0.31 writes no ``wandb-summary.json`` offline: everything is in that one binary file.

File layout (the LevelDB log format with its own header)::

    header   7 bytes   b":W&B", magic 0xBEE1 (uint16 little-endian), version byte (0)
    blocks   32 KiB each, counted from the start of the file (the header sits in block 0)
    chunk    CRC-32 (uint32 LE) | length (uint16 LE) | type (1 byte) | data
             type FULL=1 holds a whole record; FIRST=2, MIDDLE=3, LAST=4 hold the pieces of a
             record that crosses block boundaries; a block tail shorter than 7 bytes is zero
             padding. The CRC is plain CRC-32 (zlib.crc32, IEEE polynomial, unmasked) over the
             type byte followed by the data.
    record   the reassembled data of one record: a ``wandb_internal_pb2.Record`` protobuf

Where the numbers live: every ``run.log`` call writes one ``history`` record (items with a
``nested_key`` path and a JSON value, ``_step`` among them) right after a ``summary`` record with
the updated summary values; ``define_metric`` writes ``metric`` records; ``wandb.init(config=)``
puts the first config in the ``run`` record and later changes come as ``config`` records;
``run.finish()`` writes ``exit`` last, with the exit code (non-zero when the script raised).

A resumed run (``wandb.init(id=..., resume="allow")``, or Lightning's ``WandbLogger(id=...,
resume="allow")``) is written in parts: one run folder, and one ``.wandb`` file, per process, all
with the same run id. Reading a folder reads the whole run: every part, merged (see
:func:`read_run`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CRASHED",
    "FINISHED",
    "UNFINISHED",
    "MetricDefinition",
    "RunData",
    "iter_records",
    "read_run",
]

_MAGIC = b":W&B"
_MAGIC_NUMBER = 0xBEE1
_VERSION = 0
_HEADER = _MAGIC + struct.pack("<HB", _MAGIC_NUMBER, _VERSION)
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

# Run folder names: "run-20240101_120000-abc123" online, "offline-run-..." offline.
_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")
_GOALS = {1: "minimize", 2: "maximize"}
_POLL = 0.02  # seconds between reads while waiting for a run to finish writing
_SUMMARY_KINDS = ("min", "max", "mean", "best", "last", "none", "copy", "first")
_NO_EXIT = "no exit record"  # starts the reader's message for a run without its end

# RunData.state: how the run ended, from its exit record.
FINISHED = "finished"  # exit record with exit code 0
CRASHED = "crashed"  # exit record with a non-zero exit code: the script raised or exited with one
UNFINISHED = "unfinished"  # no exit record: still running or killed (or the file is cut short)


@dataclass(frozen=True)
class MetricDefinition:
    """One ``define_metric`` definition, merged over all the calls for the same name.

    Attributes:
        name: The metric name, or the glob (``"*"``, ``"train/*"``) when ``glob`` is true.
        glob: Whether ``name`` is a glob pattern.
        step_metric: The metric used as this one's x-axis, if any.
        step_sync: Whether W&B fills in the step metric's last value on rows that lack it.
        hidden: Whether the metric is hidden from automatic charts.
        summary: Summary aggregations asked for, e.g. ``("min", "max")``.
        goal: ``"minimize"``, ``"maximize"`` or ``None``.
    """

    name: str
    glob: bool = False
    step_metric: str | None = None
    step_sync: bool = False
    hidden: bool = False
    summary: tuple[str, ...] = ()
    goal: str | None = None


@dataclass
class RunData:
    """What a run's ``.wandb`` file holds, decoded into plain Python values.

    Attributes:
        path: The ``.wandb`` file that was read.
        run_id: The run id (``None`` if the run record could not be read).
        project: The project name, when recorded.
        name: The run's display name, when recorded.
        history: One dict per ``run.log`` row, in order: key -> value, including ``_step``,
            ``_runtime``, ``_timestamp`` and, for Lightning runs, ``trainer/global_step``.
            Nested dicts are flattened with ``"."`` as W&B's history does (``{"a": {"b": 1}}``
            gives ``"a.b"``); media objects (dicts with a ``"_type"``) stay whole.
        summary: The run summary as W&B holds it (nested dicts stay nested, so a metric
            defined with ``summary="min,max"`` maps to ``{"min": ..., "max": ...}``), rebuilt
            from the summary records; a history key with no summary entry gets its last value.
        metrics: ``define_metric`` definitions by name (globs such as ``"*"`` included).
        config: The run config (the ``_wandb`` bookkeeping entry left out).
        complete: True when the ``exit`` record was read: the run ended (finished or crashed,
            see ``exit_code`` and :attr:`state`) and its file holds that end.
        exit_code: The exit code from the ``exit`` record, if read; non-zero for a crashed run.
        errors: What could not be read, one message each; empty for a clean, complete file.
        parts: For a resumed run read from a folder, each part (one per process, oldest first)
            read on its own; the fields above are then the merged run. Empty for a run in one
            part.
    """

    path: Path
    run_id: str | None = None
    project: str | None = None
    name: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, MetricDefinition] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    exit_code: int | None = None
    errors: list[str] = field(default_factory=list)
    parts: list[RunData] = field(default_factory=list)

    @property
    def state(self) -> str:
        """How the run ended: ``"finished"``, ``"crashed"`` or ``"unfinished"``.

        ``"finished"``: its exit record says exit code 0. ``"crashed"``: its exit record has a
        non-zero exit code (the script raised, or called ``run.finish(exit_code=...)``).
        ``"unfinished"``: no exit record, so the run is still running or was killed (or the
        file was cut short).

        Example:
            >>> RunData(path=Path("run.wandb"), complete=True, exit_code=1).state
            'crashed'
        """
        if not self.complete:
            return UNFINISHED
        return CRASHED if self.exit_code else FINISHED

    def keys(self) -> list[str]:
        """Every history key, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.history:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def step_key(self) -> str:
        """The run's x-axis: the optimizer step its trainer logged, else W&B's ``_step``.

        ``"trainer/global_step"`` when the history has it (Lightning runs), else
        ``"train/global_step"`` when it has that (``transformers.Trainer`` runs, whose values
        logged in separate rows at one step share it), else ``"_step"``.

        Example:
            >>> RunData(path=Path("run.wandb"), history=[{"_step": 0, "train/global_step": 5}]
            ...         ).step_key()
            'train/global_step'
        """
        for key in ("trainer/global_step", "train/global_step"):
            if any(key in row for row in self.history):
                return key
        return "_step"

    def series(self, key: str) -> list[tuple[int | float, Any]]:
        """The ``(step, value)`` pairs logged for ``key``, in logging order.

        The step is the run's :meth:`step_key`: ``trainer/global_step`` when the run has it
        (Lightning's x-axis), else ``train/global_step`` (``transformers.Trainer``'s), else W&B's
        own ``_step``. Rows that lack the key, or the step, are skipped.

        Args:
            key: A history key, e.g. ``"train/perplexity"``.

        Returns:
            A list of ``(step, value)`` tuples; empty if the key was never logged.

        Example:
            >>> run = RunData(path=Path("run.wandb"), history=[
            ...     {"_step": 0, "trainer/global_step": 1, "loss": 2.5},
            ...     {"_step": 1, "trainer/global_step": 3, "loss": 2.0},
            ... ])
            >>> run.series("loss")
            [(1, 2.5), (3, 2.0)]
        """
        step_key = self.step_key()
        return [(row[step_key], row[key]) for row in self.history if key in row and step_key in row]

    def last(self, key: str, default: Any = None) -> Any:
        """The last value logged for ``key`` in the history, or ``default``."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return default


def read_run(path: str | os.PathLike[str], *, sep: str = ".", wait: float = 0.0) -> RunData:
    """Read a W&B run from its local files, without network or W&B API calls.

    ``path`` may be:

    - a ``.wandb`` file;
    - a run folder (``.../wandb/offline-run-*`` or ``.../wandb/run-*``);
    - a ``wandb/`` folder, or the save dir that holds one: the latest run there is read (the
      one ``wandb/latest-run`` points to, else the newest by the time in the folder name, then
      by the file's modification time). ``RunData.path`` tells which file was read.

    A folder reads the whole run: when the run was resumed, its other parts (the run folders of
    the same run id beside it, ``offline-run-*`` or ``run-*``) are read too and merged, oldest
    first, and ``RunData.parts`` holds each part read on its own. A ``.wandb`` file is read alone,
    which is how to read one part. Merging:

    - ``_step``: wandb offline counts each part from 0; a part that does so is numbered on from
      the part before it, as W&B numbers the steps of an online resumed run.
    - history: each step once per key, the later part winning for a key logged at the same step
      in both (the rows after the checkpoint that the resumed process logged again); a row left
      with nothing of its own is dropped; the rows are then in step order (``trainer/global_step``
      when the run has it, else ``_step``), parts in order within a step.
    - summary: the last part's, plus the keys only earlier parts had; ``define_metric``
      definitions and config: merged, the later part winning; run id, project, name, exit
      record and ``path``: the last part's.
    - errors: every part's, each naming its run folder, but for an earlier part's missing exit
      record (a process killed, then resumed: see its ``state`` in ``parts``). A part whose
      file cannot be read (empty: killed at once, or just started) is an error and a part with
      no history and no end; only when no part can be read does ``read_run`` raise.

    A truncated, partly written or corrupt file does not raise: whatever could be read is
    returned, with ``complete=False`` and a message per problem in ``errors``. A run still being
    written reads the same way, without its end.

    wandb 0.31 can return from ``run.finish()`` before its writer has flushed the file (it may
    still hold only the header a few milliseconds later): pass ``wait`` to poll until the
    ``exit`` record is there.

    Args:
        path: Where the run is, as above.
        sep: Separator used to join the keys of a nested dict logged as a history value.
        wait: Seconds to keep re-reading until the run (its last part) is complete; 0 reads once.

    Returns:
        The decoded :class:`RunData`.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no W&B run.
        ValueError: The file is not a W&B run file (wrong header) or has an unsupported
            format version; ``wait`` is negative.

    Example:
        Print the perplexity curve of the last run under ``./wandb``::

            run = read_run("wandb")
            for step, value in run.series("train/perplexity"):
                print(step, value)
            if not run.complete:
                print("incomplete:", "; ".join(run.errors))
    """
    if not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    path = Path(path)
    file = _find_run_file(path)
    files = [file] if path.is_file() else _run_parts(file)
    if len(files) == 1:
        return _read_file(file, sep, wait)
    parts = []
    failures = []
    for i, part in enumerate(files, 1):
        try:
            parts.append(_read_file(part, sep, wait if i == len(files) else 0.0))
        except (OSError, ValueError) as exc:
            # E.g. an empty file: a process killed at once, or a resumed one that just started.
            # It stays in the list, without history or end, so that the run reads unfinished.
            failures.append(exc)
            parts.append(RunData(path=part, errors=[f"{part.name}: part not read ({exc})"]))
    if len(failures) == len(parts):
        raise failures[-1]
    return _merge(parts)


def _read_file(file: Path, sep: str, wait: float) -> RunData:
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        # A file just created may not even hold its header yet.
        if remaining > 0 and file.stat().st_size < len(_HEADER):
            time.sleep(min(_POLL, remaining))
            continue
        run = RunData(path=file)
        _Assembler(run, sep).consume(iter_records(file, run.errors))
        remaining = deadline - time.monotonic()
        if run.complete or remaining <= 0:
            return run
        time.sleep(min(_POLL, remaining))


def iter_records(path: str | os.PathLike[str], errors: list[str] | None = None) -> Iterator[Any]:
    """Yield each ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in file order.

    Reading stops quietly at the end of what was written; problems (truncation, CRC mismatch,
    undecodable record) are appended to ``errors`` instead of raised, and reading resumes at
    the next block after a corrupt chunk, like LevelDB's log reader.

    Args:
        path: A ``.wandb`` file.
        errors: A list that receives one message per problem; ``None`` to drop them.

    Raises:
        ValueError: The file does not start with a W&B header of a supported version.

    Example:
        Count the records by type::

            from collections import Counter
            Counter(r.WhichOneof("record_type") for r in iter_records("run-abc123.wandb"))
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    errors = [] if errors is None else errors
    for offset, payload in _iter_payloads(Path(path), errors):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            errors.append(f"record at byte {offset}: not a valid W&B record ({exc})")
            continue
        yield record


def _iter_payloads(path: Path, errors: list[str]) -> Iterator[tuple[int, bytes]]:
    """Reassemble the chunked payloads; yields ``(offset of the first chunk, payload)``."""
    data = path.read_bytes()
    _check_header(path, data)
    size = len(data)
    pos = len(_HEADER)
    pending: bytearray | None = None
    pending_at = 0
    # After a corrupt chunk, pieces of a record whose start was lost must be dropped.
    resyncing = False

    def corrupt(message: str) -> int:
        nonlocal pending, resyncing
        errors.append(f"{path.name}: {message}; skipped to the next block")
        pending, resyncing = None, True
        return (pos // _BLOCK + 1) * _BLOCK

    while pos < size:
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:
            pos += room  # zero padding at the end of a block
            continue
        if pos + _CHUNK_HEADER.size > size:
            errors.append(f"{path.name}: file ends inside a chunk header at byte {pos} (truncated)")
            pending = None
            break
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if crc == 0 and length == 0 and kind == 0:
            # A zero-filled region: space reserved but never written (e.g. after a crash).
            pos = corrupt(f"zero-filled chunk header at byte {pos}")
            continue
        if length > room - _CHUNK_HEADER.size:
            pos = corrupt(f"chunk at byte {pos} claims {length} bytes, more than its block holds")
            continue
        if end > size:
            errors.append(
                f"{path.name}: file ends inside a chunk at byte {pos} "
                f"({length} bytes announced, {size - start} present; truncated)"
            )
            pending = None
            break
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes((kind,)))) != crc:
            pos = corrupt(f"CRC mismatch in the chunk at byte {pos}")
            continue
        chunk_at, pos = pos, end
        if kind == _FULL:
            if pending is not None:
                errors.append(f"{path.name}: record started at byte {pending_at} has no end")
            pending, resyncing = None, False
            yield chunk_at, chunk
        elif kind == _FIRST:
            if pending is not None:
                errors.append(f"{path.name}: record started at byte {pending_at} has no end")
            pending, pending_at, resyncing = bytearray(chunk), chunk_at, False
        elif kind in (_MIDDLE, _LAST):
            if pending is None:
                if not resyncing:
                    errors.append(f"{path.name}: record piece at byte {chunk_at} has no start")
                continue
            pending += chunk
            if kind == _LAST:
                yield pending_at, bytes(pending)
                pending = None
        else:
            pos = corrupt(f"unknown chunk type {kind} at byte {chunk_at}")
    if pending is not None:
        errors.append(
            f"{path.name}: file ends inside the record started at byte {pending_at} (truncated)"
        )


def _check_header(path: Path, data: bytes) -> None:
    if len(data) < len(_HEADER) or data[: len(_MAGIC)] != _MAGIC:
        raise ValueError(
            f"{path} is not a W&B run file: it does not start with the {_MAGIC!r} header"
            + (" (the file is empty)" if not data else "")
        )
    magic, version = struct.unpack_from("<HB", data, len(_MAGIC))
    if magic != _MAGIC_NUMBER:
        raise ValueError(
            f"{path} is not a W&B run file: magic number {magic:#06x}, "
            f"expected {_MAGIC_NUMBER:#06x}"
        )
    if version != _VERSION:
        raise ValueError(
            f"{path}: W&B run file format version {version} is not supported (only {_VERSION})"
        )


def _find_run_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if files:
        # One per run folder; several only if something copied files around: take the newest.
        return max(files, key=lambda f: f.stat().st_mtime)
    wandb_dir = path / "wandb" if (path / "wandb").is_dir() else path
    latest = wandb_dir / "latest-run"
    if latest.is_dir():
        files = sorted(latest.glob("run-*.wandb"))
        if files:
            return max(files, key=lambda f: f.stat().st_mtime)
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


def _run_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """The folders of ``run_id``'s parts in ``wandb_dir``, oldest first."""
    found = []
    for folder in wandb_dir.iterdir():
        match = _RUN_DIR.match(folder.name)
        # latest-run is a link to one of them; a part's folder is unique to its start second.
        if match and match.group(2) == run_id and folder.is_dir() and not folder.is_symlink():
            found.append((match.group(1), folder))
    return [folder for _, folder in sorted(found)]


def _run_parts(file: Path) -> list[Path]:
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
    for folder in _run_folders(real.parent, match.group(2)):
        if folder.name == real.name:
            files.append(file)
            continue
        candidates = list((base / folder.name).glob("run-*.wandb"))
        if candidates:  # a folder left without its file (deleted, or never written) is no part
            files.append(max(candidates, key=lambda f: f.stat().st_mtime))
    return files


def _part_name(file: Path) -> str:
    # Every part's file is run-<id>.wandb: its folder tells them apart.
    return f"{file.parent.resolve().name}/{file.name}"


def _merge(parts: list[RunData]) -> RunData:
    """One run from the parts of a resumed run, oldest first (rules in :func:`read_run`)."""
    last = parts[-1]
    run = RunData(
        path=last.path,
        run_id=_last_set(p.run_id for p in parts),
        project=_last_set(p.project for p in parts),
        name=_last_set(p.name for p in parts),
        complete=last.complete,
        exit_code=last.exit_code,
        parts=parts,
    )
    histories = _continue_steps([part.history for part in parts])
    step_key = (
        "trainer/global_step"
        if any("trainer/global_step" in row for rows in histories for row in rows)
        else "_step"
    )
    run.history = _merge_histories(histories, step_key)
    for part in parts:
        run.summary.update(part.summary)
        run.config.update(part.config)
        for name, new in part.metrics.items():
            old = run.metrics.get(name)
            run.metrics[name] = new if old is None else _merge_definitions(old, new)
        # An earlier part without its end is a process that was killed, then resumed.
        kept = [e for e in part.errors if part is last or _NO_EXIT not in e]
        prefix = f"{part.path.name}: "
        run.errors += [f"{_part_name(part.path)}: {e.removeprefix(prefix)}" for e in kept]
    if _is_step(run.summary.get("_step")):
        # The last part counted its own steps: the summary follows the renumbering.
        run.summary["_step"] = max(
            (row["_step"] for row in run.history if _is_step(row.get("_step"))),
            default=run.summary["_step"],
        )
    return run


def _last_set(values: Iterator[str | None]) -> str | None:
    found = None
    for value in values:
        found = value or found
    return found


def _merge_definitions(old: MetricDefinition, new: MetricDefinition) -> MetricDefinition:
    # As W&B merges two define_metric calls for one name: what the later call sets wins.
    return MetricDefinition(
        name=new.name,
        glob=new.glob,
        step_metric=new.step_metric or old.step_metric,
        step_sync=new.step_sync or old.step_sync,
        hidden=new.hidden or old.hidden,
        summary=new.summary or old.summary,
        goal=new.goal or old.goal,
    )


def _is_step(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _continue_steps(histories: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Copies of the parts' rows, a part whose ``_step`` starts over numbered on from the last."""
    out = []
    previous: int | float | None = None
    for rows in histories:
        steps = [row["_step"] for row in rows if _is_step(row.get("_step"))]
        shift = 0
        # Offline, wandb cannot know where the run stopped: each part counts from 0 again.
        if previous is not None and steps and steps[0] <= previous:
            shift = previous + 1 - steps[0]
        copies = []
        for row in rows:
            row = dict(row)
            if shift and _is_step(row.get("_step")):
                row["_step"] += shift
            copies.append(row)
        out.append(copies)
        if steps:
            previous = max(steps) + shift
    return out


def _merge_histories(histories: list[list[dict[str, Any]]], step_key: str) -> list[dict[str, Any]]:
    """The rows of all parts in step order, each key once per step (the later part wins)."""
    # Keys the later parts logged at each step; W&B's own (_step, _runtime, ...) and the step
    # itself are in every row and say nothing about which values were logged again.
    logged_later: dict[Any, set[str]] = {}
    kept: list[list[dict[str, Any]]] = []
    for rows in reversed(histories):
        own: dict[Any, set[str]] = {}
        part = []
        for row in rows:
            step = row.get(step_key)
            if _is_step(step):
                again = logged_later.get(step, set())
                mine = {k for k in row if not k.startswith("_") and k != step_key}
                if again & mine:
                    row = {k: v for k, v in row.items() if k not in again}
                    if not mine - again:
                        continue  # everything in it was logged again by a later part
                own.setdefault(step, set()).update(mine)
            part.append(row)
        for step, keys in own.items():
            logged_later.setdefault(step, set()).update(keys)
        kept.append(part)
    kept.reverse()

    ordered = []
    floor = -math.inf
    for index, rows in enumerate(kept):
        steps = [row[step_key] for row in rows if _is_step(row.get(step_key))]
        # A row without the step sits at the step of the row before it in its part.
        current = steps[0] if steps else floor
        for position, row in enumerate(rows):
            if _is_step(row.get(step_key)):
                current = row[step_key]
            ordered.append(((current, index, position), row))
        floor = max([floor, *steps])
    ordered.sort(key=lambda item: item[0])
    return [row for _, row in ordered]


def _decode(value_json: str) -> Any:
    # W&B writes NaN and ±Infinity as bare words, which json.loads accepts.
    return json.loads(value_json)


def _item_path(item: Any) -> tuple[str, ...]:
    return tuple(item.nested_key) if item.nested_key else (item.key,)


def _history_value(item: Any) -> Any:
    if item.value_json:
        return _decode(item.value_json)
    # The "typed" history encoding (x_history_value_encoding="typed") uses a oneof instead.
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    value = getattr(item, kind)
    return _decode(value) if kind == "json" else value


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[path[-1]] = value


def _remove_path(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    tree.pop(path[-1], None)


def _flatten(tree: dict[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else key
        # Media (tables, images, histograms) are dicts tagged with "_type": one value, as in W&B.
        if isinstance(value, dict) and value and "_type" not in value:
            flat.update(_flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


class _Assembler:
    """Folds records into a RunData; each handler copes with a record on its own."""

    def __init__(self, run: RunData, sep: str) -> None:
        self.run = run
        self.sep = sep
        self.last_paths: dict[tuple[str, ...], Any] = {}
        self.removed: set[str] = set()

    def consume(self, records: Iterator[Any]) -> None:
        run = self.run
        try:
            for record in records:
                kind = record.WhichOneof("record_type")
                handler = getattr(self, f"_on_{kind}", None)
                if handler is None:
                    continue
                try:
                    handler(getattr(record, kind))
                except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                    run.errors.append(f"record {record.num} ({kind}): could not decode ({exc})")
        except OSError as exc:
            run.errors.append(f"{run.path}: read failed ({exc})")
        self._fill_summary_from_history()
        if not run.complete:
            # A script that raises still gets an exit record (non-zero code) from wandb's hook.
            run.errors.append(
                f"{run.path.name}: {_NO_EXIT}: the run did not finish (still running or killed) "
                "or the file is truncated"
            )

    def _on_run(self, rec: Any) -> None:
        run = self.run
        run.run_id = rec.run_id or run.run_id
        run.project = rec.project or run.project
        run.name = rec.display_name or run.name
        self._apply_config(rec.config)
        self._apply_summary(rec.summary)

    def _on_config(self, rec: Any) -> None:
        self._apply_config(rec)

    def _apply_config(self, rec: Any) -> None:
        for item in rec.update:
            path = _item_path(item)
            if path[0] != "_wandb":  # W&B's own bookkeeping, not the user's config
                _set_path(self.run.config, path, _decode(item.value_json))
        for item in rec.remove:
            _remove_path(self.run.config, _item_path(item))

    def _on_summary(self, rec: Any) -> None:
        self._apply_summary(rec)

    def _apply_summary(self, rec: Any) -> None:
        for item in rec.update:
            _set_path(self.run.summary, _item_path(item), _decode(item.value_json))
        for item in rec.remove:
            path = _item_path(item)
            _remove_path(self.run.summary, path)
            self.removed.add(path[0])

    def _on_history(self, rec: Any) -> None:
        tree: dict[str, Any] = {}
        for item in rec.item:
            path = _item_path(item)
            value = _history_value(item)
            _set_path(tree, path, value)
            self.last_paths[path] = value
        row = _flatten(tree, self.sep)
        if "_step" not in row and rec.HasField("step"):
            row["_step"] = rec.step.num
        self.run.history.append(row)

    def _on_metric(self, rec: Any) -> None:
        if rec.expanded_from_glob:
            return  # a copy of a glob definition applied to one key: the glob is kept instead
        glob = bool(rec.glob_name)
        # A "." in a key is escaped in define_metric (W&B reads a bare one as nesting); the
        # definition belongs to the key as it is logged.
        name = (rec.glob_name if glob else rec.name).replace("\\.", ".")
        old = self.run.metrics.get(name)
        if old is None or rec._control.overwrite:
            old = MetricDefinition(name=name, glob=glob)
        summary = tuple(k for k in _SUMMARY_KINDS if getattr(rec.summary, k))
        self.run.metrics[name] = MetricDefinition(
            name=name,
            glob=glob,
            step_metric=rec.step_metric or old.step_metric,
            step_sync=rec.options.step_sync or old.step_sync,
            hidden=rec.options.hidden or old.hidden,
            summary=summary or old.summary,
            goal=_GOALS.get(rec.goal, old.goal),
        )

    def _on_exit(self, rec: Any) -> None:
        self.run.complete = True
        self.run.exit_code = rec.exit_code

    def _fill_summary_from_history(self) -> None:
        # Only keys W&B's summary lacks and nobody removed: e.g. a file from a writer that sends
        # no summary records. A metric defined with summary="min" keeps only its min, as in W&B.
        missing = {path[0] for path in self.last_paths} - self.run.summary.keys() - self.removed
        for path, value in self.last_paths.items():
            if path[0] in missing:
                _set_path(self.run.summary, path, value)
