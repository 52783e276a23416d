"""What :func:`~lossplug.loggers.read_run` returns: :class:`RunData` and its parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader._media import Chart, chart_settings, is_table, load_table
from lossplug.loggers.run_reader._problems import ReadProblem

__all__ = ["CRASHED", "FINISHED", "UNFINISHED", "MetricDefinition", "RunData"]

# RunData.state: how the run ended, from its exit record.
FINISHED = "finished"  # exit record with exit code 0
CRASHED = "crashed"  # exit record with a non-zero exit code: the script raised or exited with one
UNFINISHED = "unfinished"  # no exit record: still running or killed (or the file is cut short)


def is_number(value: Any) -> bool:
    """Whether a logged value is a plain number (``bool`` is not).

    Example:
        >>> is_number(3), is_number(2.5), is_number(True), is_number("3")
        (True, True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def merge_definitions(old: MetricDefinition, new: MetricDefinition) -> MetricDefinition:
    """Two definitions of one name merged as W&B merges two ``define_metric`` calls: what the
    later call sets wins."""
    return MetricDefinition(
        name=new.name,
        glob=new.glob,
        step_metric=new.step_metric or old.step_metric,
        step_sync=new.step_sync or old.step_sync,
        hidden=new.hidden or old.hidden,
        summary=new.summary or old.summary,
        goal=new.goal or old.goal,
    )


@dataclass
class RunData:
    """What a run's ``.wandb`` file holds, decoded into plain Python values.

    Where the values come from: every ``run.log`` call writes one ``history`` record (with
    ``_step``) right after a ``summary`` record with the updated summary values;
    ``define_metric`` writes ``metric`` records; ``wandb.init(config=)`` puts the first config
    in the ``run`` record and later changes come as ``config`` records; ``run.finish()`` writes
    ``exit`` last, with the exit code (non-zero when the script raised).

    A resumed run read from a folder is its parts merged, oldest first:

    - ``_step``: wandb offline counts each part from 0; a part that does so is numbered on from
      the part before it, as W&B numbers the steps of an online resumed run.
    - history: each step once per key, the later part winning for a key logged at the same step
      in both (the rows after the checkpoint that the resumed process logged again); a row left
      with nothing of its own is dropped; the rows are then in step order (``trainer/global_step``
      when the run has it, else ``_step``), parts in order within a step.
    - summary: the last part's, plus the keys only earlier parts had; definitions, config and
      charts: merged, the later part winning; run id, project, name, exit record and ``path``:
      the last part's.
    - errors: every part's, each naming its run folder, but for an earlier part's missing exit
      record (a process killed, then resumed: see its ``state`` in ``parts``). A part whose
      file cannot be read (empty: killed at once, or just started) is an error and a part with
      no history and no end.

    Attributes:
        path: The ``.wandb`` file that was read (a resumed run's: its last part's).
        run_id: The run id (``None`` if the run record could not be read).
        project: The project name, when recorded.
        name: The run's display name, when recorded.
        history: One dict per ``run.log`` row, in order: key -> value, including ``_step``,
            ``_runtime``, ``_timestamp`` and, for Lightning runs, ``trainer/global_step``.
            Nested dicts are flattened with ``"."`` as W&B's history does (``{"a": {"b": 1}}``
            gives ``"a.b"``); media objects (dicts with a ``"_type"``) stay whole: see
            :meth:`table` and :meth:`chart`.
        summary: The run summary as W&B holds it (nested dicts stay nested, so a metric
            defined with ``summary="min,max"`` maps to ``{"min": ..., "max": ...}``), rebuilt
            from the summary records; a history key with no summary entry gets its last value.
        metrics: ``define_metric`` definitions by name (globs such as ``"*"`` included).
        config: The run config (the ``_wandb`` bookkeeping entry left out).
        complete: True when the ``exit`` record was read: the run ended (finished or crashed,
            see ``exit_code`` and :attr:`state`) and its file holds that end.
        exit_code: The exit code from the ``exit`` record, if read; non-zero for a crashed run.
        errors: What could not be read, one :class:`~lossplug.loggers.ReadProblem` each (a
            ``str`` with a ``kind`` and the ``file`` it names); empty for a clean, complete
            file. A file cut short, partly written or corrupt gives what could be read and a
            problem each; one still being written reads the same way, without its end.
        parts: For a resumed run read from a folder, each part (one per process, oldest first)
            read on its own; the fields above are then the merged run. Empty for a run in one
            part.
        charts: Custom charts (``wandb.plot.scatter``, ...) by the key they were logged under:
            W&B's panel spec for each, from the config's ``_wandb.visualize``. See :meth:`chart`.
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
    errors: list[ReadProblem] = field(default_factory=list)
    parts: list[RunData] = field(default_factory=list)
    charts: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def values(self, key: str) -> list[tuple[int | float | None, Any]]:
        """Every value logged for ``key``, in logging order, with its row's step or ``None``.

        As :meth:`series`, but a row without the step keeps its value (step ``None``).

        Example:
            >>> run = RunData(path=Path("run.wandb"), history=[
            ...     {"_step": 0, "trainer/global_step": 1, "loss": 2.5}, {"_step": 1, "loss": 2.0}])
            >>> run.values("loss"), run.series("loss")
            ([(1, 2.5), (None, 2.0)], [(1, 2.5)])
        """
        step_key = self.step_key()
        return [(row.get(step_key), row[key]) for row in self.history if key in row]

    def last(self, key: str, default: Any = None) -> Any:
        """The last value logged for ``key`` in the history, or ``default``."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return default

    def table(self, key: str) -> tuple[list[str], list[list[Any]]] | None:
        """The ``(columns, rows)`` of the last ``wandb.Table`` logged under ``key``.

        The history holds a reference (``{"_type": "table-file", "path": ...}``); the table
        itself is read from the run folder's ``files/`` (for a resumed run, from the folder of
        the part that logged it). A table only in the summary is read from there.

        Returns:
            ``None`` when no table was logged under ``key``.

        Raises:
            FileNotFoundError: The table's file is gone from the run folder.
            ValueError: That file is not a W&B table.

        Example:
            >>> import tempfile
            >>> folder = Path(tempfile.mkdtemp())
            >>> (folder / "files").mkdir()
            >>> _ = (folder / "files" / "t.table.json").write_text(
            ...     '{"columns": ["step", "loss"], "data": [[1, 2.5], [2, NaN]]}')
            >>> run = RunData(path=folder / "run-x.wandb", history=[
            ...     {"_step": 0, "t": {"_type": "table-file", "path": "t.table.json"}}])
            >>> run.table("t")
            (['step', 'loss'], [[1, 2.5], [2, nan]])
            >>> run.table("loss") is None
            True
        """
        value = self.last(key)
        if not is_table(value):
            value = self.summary.get(key)
            if not is_table(value):
                return None
        # A merged run's path is its last part's: that folder is searched once.
        run_files = dict.fromkeys([self.path, *(part.path for part in reversed(self.parts))])
        return load_table(value, run_files)

    def chart(self, key: str) -> Chart | None:
        """The custom chart logged under ``key`` (e.g. a ``wandb.plot.scatter``), with its table.

        Returns:
            ``None`` when no chart, or no table for it, was logged under ``key``.

        Raises:
            FileNotFoundError: The chart's table file is gone from the run folder.
            ValueError: That file is not a W&B table.

        Example:
            >>> import tempfile
            >>> files = Path(tempfile.mkdtemp(), "files")
            >>> files.mkdir()
            >>> table = '{"columns": ["ppl", "kpi"], "data": [[12.0, 0.5], [9.0, 0.75]]}'
            >>> _ = (files / "c.table.json").write_text(table)
            >>> run = RunData(
            ...     path=files.parent / "run-x.wandb",
            ...     history=[{"c_table": {"_type": "table-file", "path": "c.table.json"}}],
            ...     charts={"c": {"panel_type": "Vega2", "panel_config": {
            ...         "panelDefId": "wandb/scatter/v0", "fieldSettings": {"x": "ppl", "y": "kpi"},
            ...         "stringSettings": {"title": "kpi vs ppl"}}}},
            ... )
            >>> chart = run.chart("c")
            >>> chart.preset, chart.x, chart.y, chart.title
            ('wandb/scatter/v0', 'ppl', 'kpi', 'kpi vs ppl')
            >>> chart.points()
            [(12.0, 0.5), (9.0, 0.75)]
        """
        settings = chart_settings(key, self.charts.get(key))
        if settings is None:
            return None
        preset, fields, title, table_key = settings
        table = self.table(table_key)
        if table is None:
            return None
        columns, rows = table
        return Chart(key, preset, fields, title, table_key, columns=columns, rows=rows)
