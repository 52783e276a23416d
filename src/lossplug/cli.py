"""The ``lossplug`` command: report on W&B runs read back from disk, with no network.

Usage::

    lossplug report RUN [RUN ...] [--plot FILE.png] [--json] [--keys PATTERN ...]
                        [--link KEY] [--cost-key KEY] [--wait SECONDS]
    python -m lossplug.cli report RUN ...

What the report says is :mod:`lossplug.report`'s; this module parses arguments, finds the runs,
prints, and picks the exit code (see ``lossplug report --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from lossplug.loggers.run_reader import CRASHED, RunData, find_runs, read_run
from lossplug.report import (
    PlotDependencyError,
    compare_runs,
    cost_of_improvement,
    format_comparison,
    format_table,
    link_kpis,
    linked_kpis,
    numeric_keys,
    plot_comparison,
    plot_run,
    problem_line,
    report_dict,
    select_keys,
    summarize,
)
from lossplug.report.data import as_json
from lossplug.report.keys import kpi_keys, matches

__all__ = [
    "EXIT_CRASHED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_UNREADABLE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_UNREADABLE = 2
EXIT_CRASHED = 3

_PROG = "lossplug"
_REPORT_DESCRIPTION = """\
Read a W&B run from its local files (offline runs included, no network) and
print the first, last and best value of every model metric (train/, val/,
test/) and business KPI (kpi/), each with its step. "best" is the lowest or
highest value as the run's define_metric summary says, shown as (min)/(max),
else as guessed from the key's name, shown as (min?)/(max?); a total or counter
the run defined with summary="last" has no best, shown as - (last).

Below the table, "model <-> business": each KPI's Spearman rank correlation
with val/perplexity and each per-slice val/perplexity/<slice>, over the steps
where both were logged (a KPI value pairs with the perplexity logged at the same
step; KPIs with fewer than 3 such pairs and running totals are left out), the
perplexity at the step where the KPI first met its target, and, when the run
logged a cost (TrainingCost's kpi/<name>/total), the cost of each KPI's
improvement from its first value to its best. Only KPIs of the model's outcome
are linked and priced: those that measure the run itself (throughput, cost,
time to a target) are named in one line, and linked with --link KEY.

With several runs (several RUN arguments, or a folder holding several runs),
one table with a row per run: its state, steps, wall time, the final and best
val/perplexity (and its slices), every KPI's final and best, and its cost;
--plot overlays their curves, one colour per run.

The header says how the run ended: finished, CRASHED (non-zero exit code) or
UNFINISHED (no exit record: still running or killed). A resumed run (one run
folder per process, same run id) is shown whole when RUN is a folder: its parts
are merged, each step once, the later part winning.
"""
_EXIT_CODES = """\
exit codes:
  0  the run finished (exit code 0) and was read whole
  1  the run has no exit record (still running or killed), or its file is cut
     short or partly corrupt: what could be read is shown
  2  nothing could be read (missing path, not a W&B run file, no run found), bad
     arguments, or the --plot image could not be drawn (the table is still printed)
  3  the run crashed (its exit record has a non-zero exit code): what it logged is
     shown
  when several apply, 2 wins over 3, and 3 over 1
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lossplug`` command."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Tools for runs logged by lossplug (exact perplexity beside business KPIs).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print a table of a W&B run's model metrics and KPIs; optionally plot them",
        description=_REPORT_DESCRIPTION,
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "run",
        metavar="RUN",
        type=Path,
        nargs="+",
        help="a .wandb file, a run folder, a wandb/ folder or the save dir holding one "
        "(the latest run there is read); a folder gives the whole run, the parts of a resumed "
        "run merged, a .wandb file only its own part; a folder holding several save dirs or "
        "run folders below it gives each of their runs",
    )
    report.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="also draw the run into this image: perplexity (log axis, with its slices), "
        "cross-entropy and token accuracy on top, each KPI below, against the step; then each "
        'KPI against val/perplexity, its points labelled with their step; needs pip install "'
        'lossplug[plot]"',
    )
    report.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON instead of a table",
    )
    report.add_argument(
        "--keys",
        metavar="PATTERN",
        nargs="+",
        action="extend",
        help="show (and plot) only the keys matching these glob patterns, e.g. 'val/*' "
        "'kpi/pass_rate'; a plain prefix such as 'kpi' matches the keys under it; "
        "bookkeeping keys (kpi/x/seconds, epoch, ...) show only when named, e.g. '*/seconds'",
    )
    report.add_argument(
        "--link",
        metavar="KEY",
        action="append",
        default=[],
        help="also link (and price) this KPI, a key or a glob pattern, although it measures "
        "the run rather than the model (throughput, cost, time to a target); repeatable",
    )
    report.add_argument(
        "--cost-key",
        metavar="KEY",
        help="the running cost total to price each KPI's improvement with; default: the "
        "kpi/<name>/total that TrainingCost logged (kpi/cost/total by default), when there is one",
    )
    report.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_seconds,
        default=0.0,
        help="keep re-reading up to this long until the run is complete (a run that is still "
        "being written, e.g. right after training); default 0",
    )
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lossplug`` command.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 finished and read whole, 1 unfinished (no exit record) or damaged,
        2 nothing read, bad arguments or no plot, 3 crashed (see the module docs); never
        raises for bad input.

    Example:
        >>> main(["report", "no/such/run"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help/--version (0) and on bad arguments (2)
        return exc.code if isinstance(exc.code, int) else EXIT_UNREADABLE
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader went away (``lossplug report RUN | head``): not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    runs: list[RunData] = []
    labels: list[str] = []  # what the user called each run: the path it came from
    unreadable: list[str] = []
    for path in args.run:
        try:
            found = find_runs(path)
        except (OSError, ValueError) as exc:  # missing path, no run found
            unreadable.append(str(exc))
            continue
        for folder, label in zip(found, _labels(path, found), strict=True):
            run, reason = _read(folder, args.wait)
            if run is None:
                unreadable.append(reason)
            else:
                runs.append(run)
                labels.append(label)
    if len(args.run) == 1 and len(runs) + len(unreadable) == 1:
        return _report_one(runs[0], args) if runs else _fail(unreadable[0])
    return _report_many(runs, labels, unreadable, args)


def _read(path: Path, wait: float) -> tuple[RunData | None, str]:
    """The run at ``path``, or ``None`` and one line saying why it could not be read."""
    try:
        run = read_run(path, wait=wait)
    except (OSError, ValueError) as exc:  # not a W&B file, unsupported version
        return None, str(exc)
    except Exception as exc:  # an unforeseen failure still gets one line, not a traceback
        return None, f"could not read {path}: {type(exc).__name__}: {exc}"
    if run.run_id is None and not run.history:
        first = run.errors[0].detail if run.errors else ""
        return None, f"{run.path}: no W&B record could be read" + (f" ({first})" if first else "")
    return run, ""


def _report_one(run: RunData, args: argparse.Namespace) -> int:
    if args.keys is not None and not select_keys(run, args.keys):
        available = ", ".join(numeric_keys(run)) or "none"
        return _fail(
            f"no numeric key matches --keys {' '.join(args.keys)} "
            f"(numeric keys in this run: {available})"
        )
    kpis = kpi_keys(run, None)
    unknown = [pattern for pattern in args.link if not any(matches(k, [pattern]) for k in kpis)]
    if unknown:
        return _fail(
            f"--link {unknown[0]} names no KPI of this run (its KPIs: {', '.join(kpis) or 'none'})"
        )
    rows = summarize(run, args.keys)
    # The section below the table follows --keys on the KPI side: the KPIs it links and prices.
    links = link_kpis(run, args.keys, link=args.link)
    left_out = linked_kpis(run, args.keys, args.link)[1]
    try:
        costs = cost_of_improvement(run, args.keys, cost_key=args.cost_key, link=args.link)
    except ValueError as exc:  # --cost-key names no key of the run
        return _fail(f"--cost-key: {exc}")

    code = _run_code(run)
    plot_path, plot_failed = _plot(lambda: plot_run(run, args.plot, keys=args.keys), args)
    if plot_failed:
        code = EXIT_UNREADABLE
    if args.json:
        data = report_dict(run, rows, links=links, costs=costs)
        data["plot"] = None if plot_path is None else str(plot_path)
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(format_table(rows, run, links=links, costs=costs, left_out=left_out))
        if plot_path is not None:
            print(f"\nplot written to {plot_path}")
    return code


def _report_many(
    runs: list[RunData], labels: list[str], unreadable: list[str], args: argparse.Namespace
) -> int:
    if args.keys is not None and runs and not any(select_keys(run, args.keys) for run in runs):
        return _fail(f"no numeric key of the {len(runs)} runs matches --keys {' '.join(args.keys)}")
    codes = [_run_code(run) for run in runs]
    for reason in unreadable:
        _warn(reason, level="error")
    rows = compare_runs(runs, args.keys, cost_key=args.cost_key, labels=labels)
    plot_path, plot_failed = None, False
    if runs:
        plot_path, plot_failed = _plot(
            lambda: plot_comparison(runs, args.plot, keys=args.keys, rows=rows), args
        )
    if args.json:
        data = {
            "runs": as_json(rows),
            "not_read": list(unreadable),
            "plot": None if plot_path is None else str(plot_path),
        }
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(format_comparison(rows, unreadable))
        if plot_path is not None:
            print(f"\nplot written to {plot_path}")
    if unreadable or plot_failed or not runs:
        return EXIT_UNREADABLE
    # As for one run: a crash outranks an unfinished or damaged run.
    return max(codes, key=lambda code: (code == EXIT_CRASHED, code))


def _labels(path: Path, folders: list[Path]) -> list[str]:
    """What to call each run found under the ``path`` the user gave: the path itself for one
    run, else its save dir below ``path`` (``lr-1e-3`` for ``lr-1e-3/wandb/offline-run-…``),
    with the run folder where one save dir holds several runs."""
    if len(folders) == 1:
        return [str(path)]
    save_dirs = [folder.parent.parent for folder in folders]  # <save dir>/wandb/<run folder>
    return [
        str(save.relative_to(path))
        if save_dirs.count(save) == 1 and save != path
        else str(folder.relative_to(path))
        for save, folder in zip(save_dirs, folders, strict=True)
    ]


def _run_code(run: RunData) -> int:
    """The exit code one run calls for, its problem said on stderr."""
    problem = problem_line(run)
    if not problem:
        return EXIT_OK
    _warn(problem)
    return EXIT_CRASHED if run.state == CRASHED else EXIT_INCOMPLETE


def _plot(draw: Callable[[], Path], args: argparse.Namespace) -> tuple[Path | None, bool]:
    """``(path written, failed)``: a plotting failure is said on stderr and never hides the
    table."""
    if args.plot is None:
        return None, False
    try:
        return draw(), False
    except PlotDependencyError as exc:
        _warn(str(exc), level="error")
    except (OSError, ValueError) as exc:  # unwritable path, unknown image format, ...
        _warn(f"could not write the plot {args.plot}: {exc}", level="error")
    except Exception as exc:  # a plotting failure must not hide the table
        _warn(f"could not draw the plot: {type(exc).__name__}: {exc}", level="error")
    return None, True


def _fail(message: str) -> int:
    _warn(message, level="error")
    return EXIT_UNREADABLE


def _warn(message: str, *, level: str = "warning") -> None:
    # One line per problem, whatever the reader's message held.
    print(f"{_PROG} report: {level}: {' '.join(message.split())}", file=sys.stderr)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _version() -> str:
    try:
        return metadata.version("lossplug")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
