"""Summaries of a W&B run read back from disk: a table, a model ↔ business section, a plot.

Plain functions over :class:`~lossplug.loggers.RunData`, with no Lightning and no W&B API, so
the ``lossplug report`` command and a training script print the same thing::

    from lossplug.loggers import read_run
    from lossplug.report import format_table, plot_run, summarize

    run = read_run("checkpoints", wait=10)  # the save dir, a run folder or a .wandb file
    print(format_table(summarize(run), run))
    plot_run(run, "curves.png")  # needs the optional extra: pip install "lossplug[plot]"

The modules follow the data:

- :mod:`~lossplug.report.keys`: what a run holds: its numeric keys, their groups (model
  ``train/``, ``val/``, ``test/``; business ``kpi/``; other), bookkeeping, which way is best;
- :mod:`~lossplug.report.summary`: what it says about each key (first, last, best) and about the
  run (:class:`RunInfo`);
- :mod:`~lossplug.report.links`: how each KPI moved with perplexity (Spearman, perplexity at
  target);
- :mod:`~lossplug.report.cost`: what each KPI's improvement cost;
- :mod:`~lossplug.report.text`, :mod:`~lossplug.report.data`, :mod:`~lossplug.report.plot`: the
  same report as text, as JSON-ready data, and as a figure;
- :mod:`~lossplug.report.compare`: several runs side by side.
"""

from lossplug.report.compare import compare_runs, format_comparison, plot_comparison
from lossplug.report.cost import CostOfImprovement, cost_of_improvement, find_cost_key
from lossplug.report.data import report_dict
from lossplug.report.keys import numeric_keys, select_keys
from lossplug.report.links import (
    LINK_METRIC,
    MIN_LINK_POINTS,
    Link,
    link_kpis,
    linked_kpis,
    spearman,
)
from lossplug.report.plot import PlotDependencyError, build_figure, plot_run
from lossplug.report.summary import Point, Row, RunInfo, fmt_number, run_info, summarize
from lossplug.report.text import format_links, format_table, problem_line

__all__ = [
    "LINK_METRIC",
    "MIN_LINK_POINTS",
    "CostOfImprovement",
    "Link",
    "PlotDependencyError",
    "Point",
    "Row",
    "RunInfo",
    "build_figure",
    "compare_runs",
    "cost_of_improvement",
    "find_cost_key",
    "fmt_number",
    "format_comparison",
    "format_links",
    "format_table",
    "link_kpis",
    "linked_kpis",
    "numeric_keys",
    "plot_comparison",
    "plot_run",
    "problem_line",
    "report_dict",
    "run_info",
    "select_keys",
    "spearman",
    "summarize",
]
