"""How a report is drawn: the run's curves against the step, and each KPI against perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader import RunData
from lossplug.report.keys import (
    GROUP_ORDER,
    declared_direction,
    is_number,
    key_group,
    kpi_target,
    kpi_unit,
    select_keys,
    values_by_step,
)
from lossplug.report.links import LINK_METRIC, Link, link_kpis, target_step
from lossplug.report.summary import fmt_number, run_label
from lossplug.report.text import run_title

# The first panels of the default plot, in this order; any stage and slice of each shares one.
_HEADLINE_METRICS = ("perplexity", "cross_entropy", "token_accuracy")
_STEP_LABEL = "step-label"  # the gid of a scatter point's step label


class PlotDependencyError(ImportError):
    """matplotlib, needed by :func:`plot_run`, is not installed."""


def plot_run(
    run: RunData,
    path: str | Path,
    keys: Iterable[str] | None = None,
    *,
    dpi: int = 100,
    link: Iterable[str] = (),
) -> Path:
    """Draw the run's figure (:func:`build_figure`) into an image file.

    The figure is drawn off screen (Agg, no display, pyplot's global state untouched); the
    format follows the file's suffix, PNG when it has none.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        path: The image file to write; missing parent folders are created.
        keys: Which keys to draw, as in :func:`build_figure`.
        dpi: Resolution of the image.
        link: KPIs that measure the run to draw against perplexity too, as in
            :func:`~lossplug.report.link_kpis`.

    Returns:
        The path written.

    Raises:
        PlotDependencyError: matplotlib is not installed (``pip install "lossplug[plot]"``).
        ValueError: No numeric key to draw.

    Example:
        ::

            plot_run(read_run("wandb"), "curves.png")
            plot_run(run, "kpis.png", keys=["kpi/*"])
    """
    return save_figure(build_figure(run, keys, link=link), path, dpi)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (PNG when it has no suffix), creating missing folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format=None if out.suffix else "png")
    return out


def build_figure(
    run: RunData, keys: Iterable[str] | None = None, *, link: Iterable[str] = ()
) -> Any:
    """The run's curves against the step, and each KPI against ``val/perplexity``.

    By default, the first row holds the model: perplexity on a log axis (train, val and test,
    and every per-slice ``val/perplexity/<slice>``), then cross-entropy and token accuracy when
    logged; each KPI gets a panel in the rows below; all of these share the step axis. A KPI
    whose target the run recorded (``KPI(target=...)``) shows it as a dashed line, and the step
    it was first met as a dotted one; a KPI with a ``unit`` (``TrainingCost(currency="USD")``)
    carries it on its axis. Then one scatter per linked KPI (:func:`~lossplug.report.link_kpis`):
    the KPI against ``val/perplexity``, points labelled with their step where the labels do not
    overlap, the Spearman correlation in the title. With ``keys`` (patterns as in
    :func:`~lossplug.report.select_keys`), the matching keys are drawn the same way (model
    panels first, then KPIs, then other keys), and the scatters of the matching KPIs.

    Panels are titled by metric (``"perplexity"``, ``"cross_entropy"``, ...): ``train/x``,
    ``val/x``, ``test/x`` and their slices ``val/x/<slice>`` share one, labelled ``val``,
    ``val/<slice>``, ... in a legend beside the panel; a KPI panel is titled by its key; a
    scatter ``"<kpi> vs val/perplexity"``. A perplexity panel's y axis is logarithmic (it falls
    by orders of magnitude early on, which flattens the rest on a linear axis), as is any axis
    whose values span more than a factor of 20. Every row is filled: a row of two panels draws
    them wider rather than leave a cell empty.

    Args:
        run: A run from :func:`lossplug.loggers.read_run`.
        keys: Which keys to draw; ``None`` for the default above.
        link: KPIs that measure the run to draw against perplexity too.

    Returns:
        A ``matplotlib.figure.Figure`` with an Agg canvas (not registered with pyplot).

    Raises:
        PlotDependencyError: matplotlib is not installed (``pip install "lossplug[plot]"``).
        ValueError: No numeric key to draw.

    Example:
        ::

            fig = build_figure(read_run("wandb"))
            ppl = next(ax for ax in fig.axes if ax.get_title() == "perplexity")
            assert ppl.get_yscale() == "log"
    """
    wanted = None if keys is None else list(keys)
    panels = _panels(_plot_keys(run, wanted))
    if not panels:
        raise ValueError(
            f"{run.path}: nothing to plot: no numeric key"
            + ("" if wanted is None else f" matches {wanted}")
        )
    scatters = [item for item in link_kpis(run, wanted, link=link) if item.metric == LINK_METRIC]
    model = [panel for panel in panels if panel[2] == "model"]
    rest = [panel for panel in panels if panel[2] != "model"]
    fig, cells = _figure([len(model), len(rest), len(scatters)])

    step_key = run.step_key()
    shared = None
    for (title, members, _), cell in zip(model + rest, cells[0] + cells[1], strict=True):
        ax = fig.add_subplot(cell, sharex=shared)
        shared = shared or ax
        for label, key in members:
            _draw_curve(ax, run, key, label=label)
        _finish_panel(ax, title, [key for _, key in members], step_key, [(run, None)])
    pairs = {key: values_by_step(run, key) for key in {LINK_METRIC, *(s.kpi for s in scatters)}}
    for item, cell in zip(scatters, cells[2], strict=True):
        _draw_scatter(fig.add_subplot(cell), item, pairs[item.kpi], pairs[LINK_METRIC])
    fig.suptitle(run_title(run), fontsize=11)
    _drop_overlapping_labels(fig)
    return fig


def build_comparison_figure(
    runs: Sequence[RunData], keys: Sequence[str], labels: Sequence[str] | None = None
) -> Any:
    """Several runs' curves overlaid: one panel per key, one colour per run in every panel.

    Args:
        runs: Runs from :func:`lossplug.loggers.read_run`, with at least one key to draw.
        keys: The keys to draw, one panel each (``val/perplexity`` on a log axis); each KPI's
            target, when a run recorded one, as a dashed grey line, and the step each run
            first met it as a dotted line in the run's colour.
        labels: What to call each run where it has no display name (as in
            :func:`~lossplug.report.summary.run_label`).

    Returns:
        A ``matplotlib.figure.Figure``; the legend naming the runs sits below the panels.

    Raises:
        PlotDependencyError: matplotlib is not installed.
        ValueError: No key to draw.
    """
    if not keys:
        raise ValueError("nothing to plot: no key that the runs logged matches")
    fig, (cells,) = _figure([len(keys)])
    given = [None] * len(runs) if labels is None else labels
    names = [run_label(run, label) for run, label in zip(runs, given, strict=True)]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    shared = None
    for key, cell in zip(keys, cells, strict=True):
        ax = fig.add_subplot(cell, sharex=shared)
        shared = shared or ax
        for run, name, colour in zip(runs, names, colours, strict=True):
            _draw_curve(ax, run, key, label=name, color=colour)
        title = key.split("/", 1)[1] if key.startswith("val/") else key
        sources = list(zip(runs, colours, strict=True))
        _finish_panel(ax, title, [key], runs[0].step_key(), sources, legend=False)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colour, label=name, marker="o", ms=3)
        for name, colour in zip(names, colours, strict=True)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(runs)), fontsize=8)
    fig.suptitle(f"{len(runs)} runs compared", fontsize=11)
    return fig


def _figure(blocks: Sequence[int]) -> tuple[Any, list[list[Any]]]:
    """A figure whose blocks of panels each start a row, rows filled (no empty cell)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            'plotting needs matplotlib, an optional extra: pip install "lossplug[plot]"'
        ) from exc
    rows = [row for count in blocks for row in _row_sizes(count)]
    cols = max(rows, default=1)
    fig = Figure(figsize=(4.6 * cols, 3.1 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(max(len(rows), 1), 1)
    cells: list[list[Any]] = []
    row = 0
    for count in blocks:
        block: list[Any] = []
        for size in _row_sizes(count):
            block += list(grid[row].subgridspec(1, size))
            row += 1
        cells.append(block)
    return fig, cells


def _row_sizes(count: int, most: int = 3) -> list[int]:
    """``count`` panels in rows of at most ``most``, as even as can be: 4 is 2 + 2, 7 is 3+2+2."""
    if count <= 0:
        return []
    rows = math.ceil(count / most)
    return [count // rows + (1 if i < count % rows else 0) for i in range(rows)]


def _draw_curve(ax: Any, run: RunData, key: str, **style: Any) -> None:
    pts = [
        (step, value)
        for step, value in run.series(key)
        if is_number(step) and is_number(value) and math.isfinite(value)
    ]
    if not pts:
        return
    xs, ys = zip(*pts, strict=True)
    # Markers show where sparse values (a KPI every few hundred steps) really are.
    ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, ms=3, lw=1.3, **style)


def _finish_panel(
    ax: Any,
    title: str,
    keys: Sequence[str],
    step_key: str,
    sources: Sequence[tuple[RunData, str | None]],
    *,
    legend: bool = True,
) -> None:
    """Targets, scale, unit, labels and the legend of a panel whose curves are drawn.

    ``sources`` are the runs drawn, each with its colour (``None``: the colour of its curve).
    """
    for source, colour in sources:
        for key in keys:
            _draw_target(ax, source, key, colour)
    drawn = [y for line in ax.get_lines() for y in line.get_ydata() if line.get_label()[0] != "_"]
    positive = bool(drawn) and min(drawn) > 0
    # Perplexity falls by orders of magnitude early on: a log axis keeps the end readable. A
    # running total (a cost so far) grows from near zero: its spread says nothing of that.
    totals = all(
        declared_direction(source, key)[2] == "last" for source, _ in sources for key in keys
    )
    spread = positive and not totals and max(drawn) / min(drawn) > 20
    if positive and (title == "perplexity" or spread):
        ax.set_yscale("log")
        if min(drawn) >= 1:
            _plain_log_ticks(ax.yaxis)
    units = {kpi_unit(source, key) for source, _ in sources for key in keys} - {None}
    if len(units) == 1:
        ax.set_ylabel(units.pop(), fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(step_key, fontsize=8)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3)
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    if legend and len(labelled) > 1:
        # Beside the panel, never over the curves it names.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _draw_target(ax: Any, run: RunData, key: str, colour: str | None) -> None:
    """The KPI's target as a dashed line (once a panel), the step it was met as a dotted one.

    ``colour`` is the run's when several runs share the panel (the target line is then grey);
    ``None`` takes the colour of the panel's curve.
    """
    target = kpi_target(run, key)
    if target is None:
        return
    curve = ax.get_lines()[-1].get_color() if ax.get_lines() else "0.3"
    shown = [line for line in ax.get_lines() if line.get_label() == "_target"]
    if not any(list(line.get_ydata()) == [target, target] for line in shown):
        ax.axhline(target, color=(colour and "0.45") or curve, ls="--", lw=1, label="_target")
        ax.annotate(
            f"target {fmt_number(target)}",
            (0, target),
            xycoords=("axes fraction", "data"),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
            color="0.3",
        )
    step = target_step(run, key)
    if step is not None:
        ax.axvline(step, color=colour or curve, ls=":", lw=1, label="_met")
        # left of the line, so that a target met near the last step stays inside the panel
        ax.annotate(
            f"met @ {fmt_number(step)}",
            (step, target),
            xytext=(-3, -10),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color=colour or curve,
        )


def _plain_log_ticks(axis: Any) -> None:
    from matplotlib.ticker import LogFormatter

    # "20" rather than "2x10^1": a perplexity (>= 1) reads as a plain number. LogFormatter still
    # labels minor ticks only where the axis spans little, as the default one does.
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_scatter(
    ax: Any, link: Link, kpi: dict[int | float, float], ppl: dict[int | float, float]
) -> None:
    steps = [step for step in kpi if step in ppl]
    xs, ys = [ppl[s] for s in steps], [kpi[s] for s in steps]
    # A faint line in step order shows the path training took; the dots are the pairs.
    ax.plot(xs, ys, color="0.75", lw=0.8, zorder=1)
    ax.scatter(xs, ys, c=range(len(steps)), cmap="viridis", s=18, zorder=2)
    for step, x, y in zip(steps, xs, ys, strict=True):
        ax.annotate(
            fmt_number(step),
            (x, y),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
            gid=_STEP_LABEL,
        )
    # A log axis over less than a factor of 20 shows one or two tick labels: keep it linear.
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
        if min(xs) >= 1:
            _plain_log_ticks(ax.xaxis)
    rho = "n/a" if link.spearman is None else f"{link.spearman:+.2f}"
    ax.set_title(f"{link.kpi} vs {LINK_METRIC}\nSpearman {rho}, {link.points} points", fontsize=9)
    ax.set_xlabel(f"{LINK_METRIC} (labels: step)", fontsize=8)
    ax.set_ylabel(link.kpi, fontsize=8)
    ax.tick_params(which="both", labelsize=8)
    ax.grid(alpha=0.3)


def _drop_overlapping_labels(fig: Any) -> None:
    """Remove each point label that would overlap one kept before it (first and last kept)."""
    fig.canvas.draw()  # the layout fixes where each label lands
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_gid() == _STEP_LABEL]
        if len(labels) < 2:
            continue
        order = [labels[0], labels[-1], *labels[1:-1]]
        kept: list[Any] = []
        for label in order:
            box = label.get_window_extent(renderer)
            if any(box.overlaps(other) for other in kept):
                label.remove()
            else:
                kept.append(box)


def _plot_keys(run: RunData, patterns: Sequence[str] | None) -> list[str]:
    if patterns is not None:
        return select_keys(run, patterns)
    keys = select_keys(run)
    chosen = [
        k
        for k in keys
        if (key_group(k) == "model" and k.split("/")[1] in _HEADLINE_METRICS)
        or key_group(k) == "business"
    ]
    return chosen or keys  # a run with neither: draw what it has


def _panels(keys: Sequence[str]) -> list[tuple[str, list[tuple[str, str]], str]]:
    """``[(title, [(label, key), ...], group), ...]``: model panels first, headline ones first.

    ``train/x``, ``val/x``, ``test/x`` and the slices ``val/x/<slice>`` share the panel ``x``,
    labelled ``train``, ``val``, ``val/<slice>``.
    """
    panels: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key in keys:
        group = key_group(key)
        if group == "model" and key.count("/") >= 1:
            stage, name, *slice_ = key.split("/", 2)
            panels.setdefault((group, name), []).append(("/".join([stage, *slice_]), key))
        else:
            panels.setdefault((group, key), []).append((key, key))

    def order(item: tuple[tuple[str, str], Any]) -> tuple[int, int]:
        (group, title), _ = item
        headline = _HEADLINE_METRICS.index(title) if title in _HEADLINE_METRICS else 99
        return GROUP_ORDER[group], headline if group == "model" else 0

    # sorted() is stable: panels of equal rank keep the table order of their keys.
    ranked = sorted(panels.items(), key=order)
    return [(title, members, group) for (group, title), members in ranked]
