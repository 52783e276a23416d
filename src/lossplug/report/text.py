"""How a report is shown as text: the header, the table, the model ↔ business section."""

from __future__ import annotations

from collections.abc import Sequence

from lossplug.loggers.run_reader import CRASHED, FINISHED, NO_EXIT, RunData
from lossplug.report.cost import CostOfImprovement, cost_of_improvement
from lossplug.report.keys import GROUP_TITLES, numeric_keys
from lossplug.report.links import LINK_METRIC, MIN_LINK_POINTS, Link, link_kpis, linked_kpis
from lossplug.report.summary import Point, Row, fmt_number, fmt_point, last_step


def problem_line(run: RunData) -> str | None:
    """One line saying what is wrong with a run read back, or ``None`` for a clean, whole run.

    Wrong is: the run crashed (its exit record has a non-zero exit code), has no exit record
    (still running or killed), or its file could not all be read.

    Example:
        >>> from pathlib import Path
        >>> from lossplug.loggers import DAMAGED, NO_EXIT, ReadProblem
        >>> run = RunData(path=Path("run-x.wandb"), history=[{"_step": 0}], errors=[
        ...     ReadProblem.about("run-x.wandb", DAMAGED, "file ends inside a chunk at byte 900"),
        ...     ReadProblem.about("run-x.wandb", NO_EXIT, "no exit record: the run did not end")])
        >>> print(problem_line(run))
        run-x.wandb: incomplete run: file ends inside a chunk at byte 900; showing the 1 history row that could be read
        >>> print(problem_line(RunData(path=Path("run-x.wandb"), complete=True, exit_code=1)))
        run-x.wandb: the run crashed (exit code 1); showing the 0 history rows it logged
    """  # noqa: E501
    if run.state == FINISHED and not run.errors:
        return None
    shown = plural(len(run.history), "history row")
    crashed = f"crashed (exit code {run.exit_code})"
    # The line shows the run's path in full: a message about that file drops its name.
    problems = [
        e.detail if e.file == run.path.name else str(e) for e in run.errors if e.kind != NO_EXIT
    ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        state = "incomplete run" if not run.complete else "damaged run"
        if run.state == CRASHED:
            state += f", {crashed}"
        return f"{run.path}: {state}: {problems[0]}{more}; showing the {shown} that could be read"
    if run.state == CRASHED:
        return f"{run.path}: the run {crashed}; showing the {shown} it logged"
    return (
        f"{run.path}: the run has not finished (no exit record: still running or killed); "
        f"showing the {shown} written so far"
    )


def format_table(
    rows: Sequence[Row],
    run: RunData | None = None,
    *,
    links: Sequence[Link] | None = None,
    costs: Sequence[CostOfImprovement] | None = None,
    left_out: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The rows as a text table; with ``run``, a header above and the read errors below.

    Values have 4 significant digits; ``best`` ends with the direction used: ``(min)`` and
    ``(max)`` come from the run's ``define_metric``, ``(min?)`` and ``(max?)`` are guessed from
    the key's name; ``- (last)`` is a total or counter the run defined with ``summary="last"``.
    With ``run``, the "model ↔ business" section (:func:`format_links`) follows the table.

    Args:
        rows: From :func:`~lossplug.report.summarize`.
        run: The run the rows came from, for the header (id, project, name, path, history rows,
            last step, how the run ended, and the parts of a resumed run), the model ↔ business
            section and the errors.
        links: The links to show; ``None`` computes them for every KPI.
        costs: The costs of improvement to show; ``None`` computes them for every KPI.
        left_out: The KPIs not linked, with the reason
            (:func:`~lossplug.report.links.linked_kpis`); ``None`` computes them.

    Returns:
        The text, without a trailing newline.

    Example:
        >>> from pathlib import Path
        >>> from lossplug.report import summarize
        >>> run = RunData(path=Path("run.wandb"), history=[
        ...     {"_step": 0, "kpi/pass_rate": 0.25}, {"_step": 1, "kpi/pass_rate": 0.5}])
        >>> print(format_table(summarize(run)))
        key              first     last     best            points
        business KPIs
          kpi/pass_rate  0.25 @ 0  0.5 @ 1  0.5 @ 1 (max?)       2
        <BLANKLINE>
        (min?)/(max?): direction guessed from the key's name
    """
    lines = [*_header(run), ""] if run is not None else []
    if rows:
        lines += _table(rows)
        notes = []
        if any(row.direction_from == "name" for row in rows):
            notes.append("(min?)/(max?): direction guessed from the key's name")
        if any(row.summary == "last" for row in rows):
            notes.append('(last): a total or counter (define_metric summary="last"): no best')
        lines += ["", *notes] if notes else []
    else:
        lines.append("(no numeric metrics to show)")
    if run is not None:
        links = link_kpis(run) if links is None else links
        costs = cost_of_improvement(run) if costs is None else costs
        left_out = linked_kpis(run)[1] if left_out is None else left_out
        section = format_links(links, costs, run, left_out)
        lines += ["", section] if section else []
    if run is not None and run.errors:
        lines += ["", "read errors:"] + [f"  - {error}" for error in run.errors]
    return "\n".join(lines)


def format_links(
    links: Sequence[Link],
    costs: Sequence[CostOfImprovement] = (),
    run: RunData | None = None,
    left_out: Sequence[tuple[str, str]] = (),
) -> str:
    """The "model ↔ business" section: one line per link, then one per cost of improvement.

    No line starts with a key or with indentation, so that a line of the metrics table above
    stays the only one to start with its key. ``spearman`` has 3 decimals (``n/a`` when
    undefined); "perplexity at target" is ``value @ step``.

    Args:
        links: From :func:`~lossplug.report.link_kpis`.
        costs: From :func:`~lossplug.report.cost_of_improvement`.
        run: The run, to say why there is no link when it logged KPIs and none of them links;
            ``None`` says nothing.
        left_out: ``(key, reason)`` of the KPIs not linked because they measure the run, said
            in one line.

    Returns:
        The text without a trailing newline; ``""`` when there is nothing to say.

    Example:
        >>> print(format_links([Link("kpi/pass_rate", "val/perplexity", -1.0, 3, 80, 12.5)]))
        model ↔ business: Spearman rank correlation of each KPI with perplexity over the run
        (a KPI value pairs with the perplexity logged at the same step; n/a: a constant series)
        spearman  points  KPI            metric          perplexity at target
        -1.000         3  kpi/pass_rate  val/perplexity  12.5 @ 80
    """
    lines = []
    if links:
        lines += [
            "model ↔ business: Spearman rank correlation of each KPI with perplexity over the run",
            "(a KPI value pairs with the perplexity logged at the same step; n/a: a constant "
            "series)",
        ]
        head = ["spearman", "points", "KPI", "metric", "perplexity at target"]
        cells = [
            [
                "n/a" if link.spearman is None else f"{link.spearman:+.3f}",
                str(link.points),
                link.kpi,
                link.metric,
                _fmt_target(link),
            ]
            for link in links
        ]
        lines += columns(head, cells, right={1})
    elif run is not None and linked_kpis(run)[0] and not link_kpis(run):
        # Said only when no KPI of the whole run links (not when --keys left them out).
        why = (
            f"no {LINK_METRIC} logged"
            if LINK_METRIC not in numeric_keys(run)
            else f"no KPI has {MIN_LINK_POINTS} or more values logged at steps with {LINK_METRIC}"
        )
        lines.append(f"model ↔ business: {why}")
    if left_out:
        lines.append(
            f"not linked: {', '.join(key for key, _ in left_out)}: they measure the run (speed, "
            "cost, time), not the model; lossplug report --link KEY links one anyway"
        )
    if costs:
        lines += [""] if lines else []
        lines.append(
            f"cost of improvement ({costs[0].cost_key} from each KPI's first value to its best):"
        )
        for item in costs:
            lines.append(f"{item.kpi}: {_fmt_cost(item)}")
    return "\n".join(lines)


def columns(head: Sequence[str], cells: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """``head`` and ``cells`` as aligned lines, two spaces apart, trailing spaces cut.

    Columns in ``right`` are right-aligned, the rest left-aligned.

    Example:
        >>> columns(["name", "n"], [["a", "10"], ["bbb", "2"]], right={1})
        ['name   n', 'a     10', 'bbb    2']
    """
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    return [
        "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()
        for values in [head, *cells]
    ]


def run_title(run: RunData) -> str:
    """``run <id>  <project>/<name>``: one line naming the run."""
    where = "/".join(part for part in (run.project, run.name) if part)
    return f"run {run.run_id or '?'}" + (f"  {where}" if where else "")


def state_text(run: RunData) -> str:
    """How the run ended, in upper case where something went wrong so that it stands out."""
    code = "" if run.exit_code is None else f" (exit code {run.exit_code})"
    if run.state == FINISHED:
        return f"finished{code}"
    if run.state == CRASHED:
        return f"CRASHED{code}"
    return "UNFINISHED (no exit record: still running or killed)"


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, with an ``s`` unless the count is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt_target(link: Link) -> str:
    if link.target_step is None:
        return "-"
    if link.perplexity_at_target is None:  # met at a step where the metric was not logged
        return f"- (met @ {fmt_number(link.target_step)})"
    return fmt_point(Point(link.target_step, link.perplexity_at_target))


def _fmt_cost(item: CostOfImprovement) -> str:
    if item.cost_per_unit is None or item.unit is None:
        return f"n/a ({item.note})"
    sign = "+" if item.direction == "max" else "-"
    currency = f" {item.currency}" if item.currency else ""
    return (
        f"{fmt_number(item.cost_per_unit)}{currency} per {sign}{item.unit:g} "
        f"({fmt_point(item.first)} -> {fmt_point(item.best)}, "
        f"{fmt_number(item.spent)} spent)"
    )


def _header(run: RunData) -> list[str]:
    names = []
    if run.project:
        names.append(f"project {run.project}")
    if run.name:
        names.append(f"name {run.name}")
    lines = [
        "  ".join([f"run {run.run_id or '? (run record not read)'}", *names]),
        f"path {run.path}",
        f"{plural(len(run.history), 'history row')}  last step {fmt_number(last_step(run))} "
        f"({run.step_key()})  {state_text(run)}",
    ]
    if run.parts:
        lines.append(f"resumed: {len(run.parts)} parts merged, each step once (the later wins)")
        lines += [
            f"  part {i}: {part.path}  {plural(len(part.history), 'history row')}  "
            f"{state_text(part)}"
            for i, part in enumerate(run.parts, 1)
        ]
    return lines


def _table(rows: Sequence[Row]) -> list[str]:
    # Values are right-aligned within their column so that the "@" signs line up.
    points = [(row.first, row.last, row.best) for row in rows]
    value_w = [max(len(fmt_number(p[i].value)) for p in points) for i in range(2)]
    has_best = [p[2] for p in points if p[2] is not None]
    value_w.append(max((len(fmt_number(p.value)) for p in has_best), default=1))

    def cell(point: Point | None, i: int, suffix: str = "") -> str:
        if point is None:
            return "-".rjust(value_w[i]) + suffix
        return f"{fmt_number(point.value).rjust(value_w[i])} @ {fmt_number(point.step)}{suffix}"

    cells = []
    for row in rows:
        mark = f" ({row.direction}{'?' if row.direction_from == 'name' else ''})"
        if row.summary == "last":
            mark = " (last)"
        elif row.best is None:
            mark = ""
        best = cell(row.best, 2, mark)
        cells.append(["  " + row.key, cell(row.first, 0), cell(row.last, 1), best, str(row.points)])
    lines = columns(["key", "first", "last", "best", "points"], cells, right={4})
    out = [lines[0]]
    group = None
    for row, line in zip(rows, lines[1:], strict=True):
        if row.group != group:
            group = row.group
            out.append(GROUP_TITLES[group])
        out.append(line)
    return out
