"""One run from the records of one ``.wandb`` file: each record type folded into a RunData."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader._data import MetricDefinition, RunData, merge_definitions
from lossplug.loggers.run_reader._problems import DAMAGED, NO_EXIT, NOT_READ, ReadProblem
from lossplug.loggers.run_reader._records import HEADER, iter_records

__all__ = ["read_file"]

_GOALS = {1: "minimize", 2: "maximize"}
_POLL = 0.02  # seconds between reads while waiting for a run to finish writing
_SUMMARY_KINDS = ("min", "max", "mean", "best", "last", "none", "copy", "first")


def read_file(file: Path, sep: str, wait: float) -> RunData:
    """Read one ``.wandb`` file, re-reading for up to ``wait`` seconds until it is complete."""
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        # A file just created may not even hold its header yet.
        if remaining > 0 and file.stat().st_size < len(HEADER):
            time.sleep(min(_POLL, remaining))
            continue
        run = RunData(path=file)
        _Assembler(run, sep).consume(iter_records(file, run.errors))
        remaining = deadline - time.monotonic()
        if run.complete or remaining <= 0:
            return run
        time.sleep(min(_POLL, remaining))


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
        self.bookkeeping: dict[str, Any] = {}  # the config's "_wandb" entry, charts among it

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
                    run.errors.append(
                        ReadProblem(
                            f"record {record.num} ({kind}): could not decode ({exc})", DAMAGED
                        )
                    )
        except OSError as exc:
            run.errors.append(ReadProblem.about(str(run.path), NOT_READ, f"read failed ({exc})"))
        self._fill_summary_from_history()
        self._collect_charts()
        if not run.complete:
            # A script that raises still gets an exit record (non-zero code) from wandb's hook.
            run.errors.append(
                ReadProblem.about(
                    run.path.name,
                    NO_EXIT,
                    "no exit record: the run did not finish (still running or killed) "
                    "or the file is truncated",
                )
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
            elif path[:2] in (("_wandb",), ("_wandb", "visualize")):
                self._keep_bookkeeping(path, item.value_json)
        for item in rec.remove:
            path = _item_path(item)
            _remove_path(self.bookkeeping if path[0] == "_wandb" else self.run.config, path)

    def _keep_bookkeeping(self, path: tuple[str, ...], value_json: str) -> None:
        # Only the custom charts' specs are read. The rest of W&B's entry was never decoded, so
        # a spec that cannot be is left out rather than reported as a damaged run.
        with contextlib.suppress(ValueError):
            _set_path(self.bookkeeping, path, _decode(value_json))

    def _collect_charts(self) -> None:
        charts = self.bookkeeping.get("_wandb")
        charts = charts.get("visualize") if isinstance(charts, dict) else None
        if isinstance(charts, dict):
            self.run.charts = {k: v for k, v in charts.items() if isinstance(v, dict)}

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
        new = MetricDefinition(
            name=name,
            glob=glob,
            step_metric=rec.step_metric or None,
            step_sync=rec.options.step_sync,
            hidden=rec.options.hidden,
            summary=tuple(k for k in _SUMMARY_KINDS if getattr(rec.summary, k)),
            goal=_GOALS.get(rec.goal),
        )
        old = self.run.metrics.get(name)
        if old is not None and not rec._control.overwrite:
            new = merge_definitions(old, new)
        self.run.metrics[name] = new

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
