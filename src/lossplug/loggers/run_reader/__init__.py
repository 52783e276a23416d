"""Read a W&B run back from its local files, with no network and no W&B API call.

wandb 0.31 writes no ``wandb-summary.json`` offline: everything is in the run's one binary
``.wandb`` file, read here in four steps, one module each:

- ``_locate``: which ``.wandb`` file a path names, and the parts of a resumed run;
- ``_records``: the file's chunk framing undone and each protobuf record decoded;
- ``_assemble``: the records of one file folded into a :class:`RunData`;
- ``_merge``: the parts of a resumed run merged into one.

:class:`RunData` (``_data``) is the result; :class:`ReadProblem` (``_problems``) each thing that
could not be read; tables and custom charts are read from the run folder's ``files/``
(``_media``) on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

from lossplug.loggers.run_reader._assemble import read_file
from lossplug.loggers.run_reader._data import (
    CRASHED,
    FINISHED,
    UNFINISHED,
    MetricDefinition,
    RunData,
    is_number,
)
from lossplug.loggers.run_reader._locate import find_run_file, find_runs, run_parts
from lossplug.loggers.run_reader._media import Chart
from lossplug.loggers.run_reader._merge import merge
from lossplug.loggers.run_reader._problems import DAMAGED, NO_EXIT, NOT_READ, ReadProblem
from lossplug.loggers.run_reader._records import iter_records

__all__ = [
    "CRASHED",
    "DAMAGED",
    "FINISHED",
    "NOT_READ",
    "NO_EXIT",
    "UNFINISHED",
    "Chart",
    "MetricDefinition",
    "ReadProblem",
    "RunData",
    "find_runs",
    "is_number",
    "iter_records",
    "read_run",
]


def read_run(path: str | os.PathLike[str], *, sep: str = ".", wait: float = 0.0) -> RunData:
    """Read a W&B run from its local files, without network or W&B API calls.

    Args:
        path: A ``.wandb`` file (read alone: one part of a resumed run), a run folder, or a
            ``wandb/`` folder or the save dir holding one (its latest run). A folder reads
            every part of a resumed run, merged as :class:`RunData` describes.
        sep: Separator used to join the keys of a nested dict logged as a history value.
        wait: Seconds to keep re-reading until the (last part's) exit record is there, which
            wandb may still be flushing when ``run.finish()`` returns; 0 reads once.

    Returns:
        The run; a damaged or unfinished file gives what could be read, and ``errors``.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no W&B run.
        ValueError: Not a W&B run file of a supported version (every part, for a resumed
            run); ``wait`` is negative.

    Example:
        ``for step, value in read_run("wandb").series("train/perplexity"): print(step, value)``
    """
    if not isinstance(wait, (int, float)) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    path = Path(path)
    file = find_run_file(path)
    files = [file] if path.is_file() else run_parts(file)
    if len(files) == 1:
        return read_file(file, sep, wait)
    parts = []
    failures = []
    for i, part in enumerate(files, 1):
        try:
            parts.append(read_file(part, sep, wait if i == len(files) else 0.0))
        except (OSError, ValueError) as exc:
            # E.g. an empty file: a process killed at once, or a resumed one that just started.
            # It stays in the list, without history or end, so that the run reads unfinished.
            failures.append(exc)
            problem = ReadProblem.about(part.name, NOT_READ, f"part not read ({exc})")
            parts.append(RunData(path=part, errors=[problem]))
    if len(failures) == len(parts):
        raise failures[-1]
    return merge(parts)
