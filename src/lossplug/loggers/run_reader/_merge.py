"""One run from the parts of a resumed run (the rules are on :class:`RunData`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from lossplug.loggers.run_reader._data import RunData, is_number, merge_definitions
from lossplug.loggers.run_reader._locate import part_name
from lossplug.loggers.run_reader._problems import NO_EXIT, ReadProblem

__all__ = ["merge"]


def merge(parts: list[RunData]) -> RunData:
    """One run from the parts of a resumed run, oldest first."""
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
        run.charts.update(part.charts)
        for name, new in part.metrics.items():
            old = run.metrics.get(name)
            run.metrics[name] = new if old is None else merge_definitions(old, new)
        # An earlier part without its end is a process that was killed, then resumed.
        kept = [e for e in part.errors if part is last or e.kind != NO_EXIT]
        # Every part's file is run-<id>.wandb: the message names its folder too.
        name = part_name(part.path)
        for e in kept:
            detail = e.detail if e.file == part.path.name else str(e)
            run.errors.append(ReadProblem.about(name, e.kind, detail))
    if is_number(run.summary.get("_step")):
        # The last part counted its own steps: the summary follows the renumbering.
        run.summary["_step"] = max(
            (row["_step"] for row in run.history if is_number(row.get("_step"))),
            default=run.summary["_step"],
        )
    return run


def _last_set(values: Iterator[str | None]) -> str | None:
    found = None
    for value in values:
        found = value or found
    return found


def _continue_steps(histories: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Copies of the parts' rows, a part whose ``_step`` starts over numbered on from the last."""
    out = []
    previous: int | float | None = None
    for rows in histories:
        steps = [row["_step"] for row in rows if is_number(row.get("_step"))]
        shift = 0
        # Offline, wandb cannot know where the run stopped: each part counts from 0 again.
        if previous is not None and steps and steps[0] <= previous:
            shift = previous + 1 - steps[0]
        copies = []
        for row in rows:
            row = dict(row)
            if shift and is_number(row.get("_step")):
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
            if is_number(step):
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
        steps = [row[step_key] for row in rows if is_number(row.get(step_key))]
        # A row without the step sits at the step of the row before it in its part.
        current = steps[0] if steps else floor
        for position, row in enumerate(rows):
            if is_number(row.get(step_key)):
                current = row[step_key]
            ordered.append(((current, index, position), row))
        floor = max([floor, *steps])
    ordered.sort(key=lambda item: item[0])
    return [row for _, row in ordered]
