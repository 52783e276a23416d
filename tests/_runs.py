"""Offline W&B runs written by wandb itself, with metrics defined as lossplug's loggers define them.

Every metric steps by ``trainer/global_step``; a test logs its own rows between
:func:`offline_run` and :func:`finish_run`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lossplug.loggers import read_run

STEP_METRIC = "trainer/global_step"


def offline_run(
    root: Path,
    project: str,
    name: str,
    summaries: Mapping[str, str],
    no_summary: Iterable[str] = (),
):
    """An offline run saved under ``root``: each key of ``summaries`` defined with its summary
    (``"min"``, ``"max"``, ``"last"``), each of ``no_summary`` with none."""
    import wandb

    run = wandb.init(mode="offline", dir=root, project=project, name=name)
    run.define_metric(STEP_METRIC)
    for key, summary in summaries.items():
        run.define_metric(key, step_metric=STEP_METRIC, summary=summary)
    for key in no_summary:
        run.define_metric(key, step_metric=STEP_METRIC)
    return run


def finish_run(run, root: Path) -> Path:
    """Finish ``run`` and wait until its file under ``root`` ends with the exit record
    (``finish()`` can return before wandb's writer has flushed it)."""
    run.finish()
    assert read_run(root, wait=30).complete
    return root
