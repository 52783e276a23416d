"""Media a run logged: tables (``wandb.Table``) and custom charts (``wandb.plot.*``).

What W&B writes for ``run.log({"t": wandb.Table(columns=[...], data=[...])})``: a history (and
summary) value ``{"_type": "table-file", "path": "media/table/t_<step>_<hash>.table.json",
"sha256": ..., "nrows": ..., "ncols": ..., ...}`` and, at that ``path`` under the run folder's
``files/``, the JSON ``{"columns": [...], "data": [[...], ...]}`` (NaN and ±Infinity as bare
words).

For ``run.log({"c": wandb.plot.scatter(table, "x", "y", title="...")})``: the table, logged as
above under ``"c_table"`` (``"Custom Chart Tables/c_table"`` with ``split_table=True``), and a
config entry ``_wandb.visualize["c"]``: ``{"panel_type": "Vega2", "panel_config":
{"panelDefId": "wandb/scatter/v0", "fieldSettings": {"x": "x", "y": "y"}, "stringSettings":
{"title": "..."}, "userQuery": ...}}``, whose query names the table key. Other ``wandb.plot``
charts (line, bar, histogram, ...) are written the same way, with their own ``panelDefId``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Chart", "chart_settings", "is_table", "load_table"]

_TABLE_FILE = "table-file"


@dataclass
class Chart:
    """A custom chart (``wandb.plot.scatter``, ``line``, ``bar``, ...) read back with its table.

    Attributes:
        key: The key the chart was logged under.
        preset: W&B's chart preset, e.g. ``"wandb/scatter/v0"``.
        fields: Which column each role of the preset shows, e.g. ``{"x": "step", "y": "loss"}``.
        title: The chart title (``""`` when none was given).
        table_key: The key its table was logged under (``"<key>_table"`` by default).
        columns: The table's column names.
        rows: The table's rows, in order.
    """

    key: str
    preset: str
    fields: dict[str, str]
    title: str
    table_key: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)

    @property
    def x(self) -> str | None:
        """The column on the x-axis, if the preset has one."""
        return self.fields.get("x")

    @property
    def y(self) -> str | None:
        """The column on the y-axis, if the preset has one."""
        return self.fields.get("y")

    def points(self) -> list[tuple[Any, Any]]:
        """The ``(x, y)`` value of each row, in order.

        Raises:
            ValueError: The chart has no x or y field, or the table lacks its column.

        Example:
            >>> Chart("c", "wandb/scatter/v0", {"x": "a", "y": "b"}, "", "c_table",
            ...       columns=["a", "b"], rows=[[1, 0.5], [2, 0.25]]).points()
            [(1, 0.5), (2, 0.25)]
        """
        if self.x not in self.columns or self.y not in self.columns:
            raise ValueError(
                f"chart {self.key!r}: x={self.x!r}, y={self.y!r} are not both columns of its "
                f"table ({', '.join(self.columns)})"
            )
        i, j = self.columns.index(self.x), self.columns.index(self.y)
        return [(row[i], row[j]) for row in self.rows]


def is_table(value: Any) -> bool:
    """Whether a history or summary value is a logged table (W&B's ``table-file`` reference)."""
    return (
        isinstance(value, dict)
        and value.get("_type") == _TABLE_FILE
        and isinstance(value.get("path"), str)
    )


def load_table(
    value: dict[str, Any], run_files: Iterable[Path]
) -> tuple[list[str], list[list[Any]]]:
    """The ``(columns, rows)`` of the table file a ``table-file`` value points to.

    Args:
        value: The logged value (see :func:`is_table`).
        run_files: The ``.wandb`` files whose run folders may hold it, the likeliest first: a
            resumed run's media sit in the folder of the part that logged them.

    Raises:
        FileNotFoundError: No run folder holds the file (or its path leaves ``files/``).
        ValueError: The file is not a W&B table.
    """
    relative = value["path"]
    searched = []
    for run_file in run_files:
        files = (run_file.parent / "files").resolve()
        path = (files / relative).resolve()
        # The path comes from the run file: never read outside the run's own files/.
        if not path.is_relative_to(files):
            raise FileNotFoundError(f"table path {relative!r} leaves the run's files/ folder")
        if path.is_file():
            return _parse_table(path)
        searched.append(str(files))
    raise FileNotFoundError(f"table file {relative} not found under {', '.join(searched)}")


def _parse_table(path: Path) -> tuple[list[str], list[list[Any]]]:
    # W&B writes NaN and ±Infinity as bare words, which json.loads accepts.
    table = json.loads(path.read_text())
    columns, rows = (
        (table.get("columns"), table.get("data")) if isinstance(table, dict) else ((), ())
    )
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise ValueError(f"{path} is not a W&B table: no 'columns' and 'data' lists")
    return [str(c) for c in columns], [list(row) for row in rows]


def chart_settings(key: str, spec: Any) -> tuple[str, dict[str, str], str, str] | None:
    """``(preset, fields, title, table key)`` from a chart's ``_wandb.visualize`` entry.

    ``None`` when ``spec`` is not a custom chart's (a panel without a ``panelDefId``).
    """
    config = spec.get("panel_config") if isinstance(spec, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("panelDefId"), str):
        return None
    fields = {k: str(v) for k, v in (config.get("fieldSettings") or {}).items()}
    title = str((config.get("stringSettings") or {}).get("title", ""))
    return config["panelDefId"], fields, title, _table_key(config) or f"{key}_table"


def _table_key(config: dict[str, Any]) -> str | None:
    # The chart finds its table through the query it runs: summaryTable(tableKey=...).
    stack = list((config.get("userQuery") or {}).get("queryFields") or [])
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("name") == "summaryTable":
            for arg in node.get("args") or []:
                if isinstance(arg, dict) and arg.get("name") == "tableKey":
                    return str(arg.get("value"))
        stack.extend(node.get("fields") or [])
    return None
