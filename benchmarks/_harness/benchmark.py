"""A CPU benchmark script: the :class:`Benchmark` base each script subclasses and
:func:`run_benchmark`, which parses the shared options, runs the groups in child processes under
the load policy and prints the report (or, with ``--busy``, the contention table)."""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cases import Group, Result, last_error_line
from .load import add_load_options, busy_processes, describe_policy, load_policy, loadavg, quietest
from .measure import child_context, child_setup, run_in_child, time_interleaved
from .report import (
    CONTENTION_HEAD,
    contention_table,
    footer,
    header,
    machine_info,
    markdown_table,
    progress_line,
    results_json,
    write_json,
)


class Benchmark:
    """One CPU benchmark script: a subclass sets the class attributes and overrides
    :meth:`inputs`, :meth:`build_call`, :meth:`measure`, :meth:`plan` and :meth:`report`; the
    other methods have defaults. :func:`run_benchmark` does the rest.

    The first three run in the child processes (the instance is pickled, by its class's name),
    everything else in the parent.
    """

    title = ""  # "lossplug X CPU": the reports are "<title> benchmark" and "<title> contention"
    description = ""  # the --help line
    preload: Sequence[str] = ("torch", "lossplug")  # what the forkserver imports once
    repeats = 5  # default of --repeats
    only_example = ""  # an --only value for the help text
    notes: Sequence[str] = ()  # lines printed after the footer, before the tables
    anchor_name = "anchor"  # in the --busy method line: "median lossplug ÷ median ..."
    contention_note = ""  # appended to the --busy method line
    errors_allowed: tuple[str, ...] = ()  # impls whose failure does not fail the run
    result_type: type[Result] = Result  # also the row of a case whose child died
    # the method line of the report: "<job><measured> from one cold call, ..., <interleaved>
    # interleaved in one process per group after <warm_up> each"
    job = ""
    measured = "peak extra memory and error"
    interleaved = "lossplug and its anchors"
    warm_up = "a warm-up call"

    def inputs(self, case: Any) -> tuple[torch.Tensor, ...]:
        """The inputs of ``case`` (of its group: the same for every impl), built in a child; a
        gradient of any of them is dropped after each timed call."""
        raise NotImplementedError

    def build_call(self, case: Any, *inputs: torch.Tensor) -> Callable[[], Any]:
        """The zero-argument call of ``case.impl`` on ``inputs``, the one timed."""
        raise NotImplementedError

    def measure(self, case: Any, result: Result) -> None:
        """In a child of its own: fill ``result`` from one cold call of ``case``
        (:func:`cold_call`), and its errors against float64; an exception is the row's error."""
        raise NotImplementedError

    def plan(self, args: argparse.Namespace, workdir: str) -> list[Group]:
        """The groups to run (``--only`` is applied afterwards); ``workdir`` is a scratch
        folder the children may share files through, removed at the end."""
        raise NotImplementedError

    def method(self, args: argparse.Namespace) -> str:
        """What is measured and how: the middle of the method line of the report."""
        return (
            f"{self.job}{self.measured} from one cold call, each case in its own process; time = "
            f"median of {self.timed_calls(args)}, {self.interleaved} interleaved in one process "
            f"per group after {self.warm_up} each"
        )

    def timed_calls(self, args: argparse.Namespace) -> str:
        return f"{args.repeats} calls per case"

    def report(self, results: list[Any], groups: list[Group]) -> str:
        """The tables, in Markdown."""
        raise NotImplementedError

    def pairs(self, group: Group) -> dict[str, tuple[str, ...]]:
        """``{lossplug impl: the anchors it is compared with}`` of ``group``."""
        return {"lossplug": tuple(i for i in group.timed if i != "lossplug")}

    def progress(self, res: Any) -> str:
        """One line per measured case while the run goes on."""
        return progress_line(res, res.case.impl)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The script's own options."""

    def check_arguments(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Reject bad values of the script's own options with ``parser.error``."""

    def info(self) -> dict[str, str]:
        """The machine and versions of the report's header."""
        return machine_info()

    def before_group(self, group: Group, ctx: multiprocessing.context.BaseContext) -> None:
        """Runs in the parent before the group's children (e.g. to write a shared file)."""

    def after_group(self, group: Group) -> None:
        """Runs in the parent after the group's children."""

    def main(self, argv: list[str] | None = None) -> int:
        return run_benchmark(self, argv)


def measure_memory(job: tuple[Benchmark, Any], parent_pid: int) -> Result:
    """Child-process body: :meth:`Benchmark.measure` of one case."""
    bench, case = job
    child_setup(parent_pid, case.threads)
    result = bench.result_type(case)
    try:
        bench.measure(case, result)
    except Exception:  # reported in the table instead of ending the whole run
        result.error = last_error_line()
    return result


def measure_times(job: tuple[Benchmark, Group], parent_pid: int) -> dict[str, Any]:
    """Child-process body: :func:`time_interleaved` of the timed impls of a group, on one set of
    inputs."""
    bench, group = job
    child_setup(parent_pid, group.setup.threads)
    inputs = bench.inputs(group.setup)
    builders = {
        impl: functools.partial(bench.build_call, group.case(impl), *inputs) for impl in group.timed
    }

    def drop_grads() -> None:
        for tensor in inputs:
            tensor.grad = None

    return time_interleaved(builders, group.repeats, after_each=drop_grads)


def run_benchmark(bench: Benchmark, argv: list[str] | None = None) -> int:
    """Parse the command line, run the groups of ``bench.plan``, print the report; exit status.

    The options are the shared ones (``--quick``, ``--repeats``, ``--threads``, ``--only``,
    ``--json``, the load policy's), the script's own and ``--busy N``/``--rounds``, which run
    :func:`contention_main` instead.
    """
    parser = argparse.ArgumentParser(description=bench.description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    parser.add_argument(
        "--repeats", type=int, default=bench.repeats, help="timed calls per case (median)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the groups whose label contains TEXT (repeatable), "
        f'e.g. --only "{bench.only_example}"',
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    add_load_options(parser)
    bench.add_arguments(parser)
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="also time every group with N busy-looping background processes (started and "
        "stopped by this script), quiet and busy alternating for --rounds rounds; prints "
        "lossplug ÷ anchor ratios per round (worst and median) instead of the memory table",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --busy (default 3)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    bench.check_arguments(parser, args)
    with tempfile.TemporaryDirectory(prefix="lossplug-bench-") as workdir:
        groups = bench.plan(args, workdir)
        if args.only:
            groups = [g for g in groups if any(text in g.label for text in args.only)]
        ctx = child_context(bench.preload)
        if args.busy > 0:
            return contention_main(bench, args, groups, ctx)
        return _benchmark_main(bench, args, groups, ctx)


def _benchmark_main(
    bench: Benchmark,
    args: argparse.Namespace,
    groups: list[Group],
    ctx: multiprocessing.context.BaseContext,
) -> int:
    policy = load_policy(args)
    info = bench.info()
    n_cases = sum(len(g.impls) for g in groups)
    method = f"{n_cases} cases; {bench.method(args)}; {describe_policy(policy)}"
    print(header(f"{bench.title} benchmark", info, args.threads, method), flush=True)
    results: list[Result] = []
    load_before = loadavg()
    t_start = time.perf_counter()
    for group in groups:
        bench.before_group(group, ctx)
        for res in run_group(bench, group, ctx, policy):
            results.append(res)
            print(bench.progress(res), flush=True)
        bench.after_group(group)
    # other processes on a small machine inflate wall times: say how busy it was
    print(footer(results, load_before, time.perf_counter() - t_start))
    for line in bench.notes:
        print(line)
    print(bench.report(results, groups))
    if args.json:
        write_json(args.json, results_json(info, results))
    failed = any(r.error for r in results if r.case.impl not in bench.errors_allowed)
    return 1 if failed else 0


def run_group(
    bench: Benchmark,
    group: Group,
    ctx: multiprocessing.context.BaseContext,
    policy: dict[str, Any],
) -> list[Result]:
    """Memory of each case of ``group`` (one process each), then the interleaved timing (one
    process, redone while the machine was busy as ``policy`` says; memory does not depend on
    load)."""
    results = []
    for impl in group.impls:
        case = group.case(impl)
        try:
            results.append(run_in_child(measure_memory, (bench, case), ctx))
        except Exception as exc:  # e.g. the child was killed for memory
            results.append(bench.result_type(case, error=f"{type(exc).__name__}: {exc}"))

    def timing() -> dict[str, Any]:
        try:
            return run_in_child(measure_times, (bench, group), ctx)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            return {"times": {}, "errors": dict.fromkeys(group.impls, error)}

    timed, shares = quietest(timing, policy)
    for res in results:
        res.times_s = timed["times"].get(res.case.impl, [])
        res.background_cpu = timed.get("background_cpu")
        res.timing_attempts = len(shares)
        if res.error is None and res.case.impl in timed["errors"]:
            res.error = timed["errors"][res.case.impl]
    return results


def contention_main(
    bench: Benchmark,
    args: argparse.Namespace,
    groups: list[Group],
    ctx: multiprocessing.context.BaseContext,
) -> int:
    """``--busy N``: lossplug ÷ anchor time ratios of every group, quiet and with N busy
    processes, in one table."""
    method = (
        f"--busy {args.busy}: each group timed {args.rounds} rounds, each round quiet then with "
        f"{args.busy} busy-looping processes (fresh child each, {args.repeats} interleaved calls "
        f"per impl); ratio = median lossplug ÷ median {bench.anchor_name} of one timing"
        f"{bench.contention_note}"
    )
    print(header(f"{bench.title} contention", machine_info(), args.threads, method), flush=True)
    table: list[list[str]] = []
    for group in groups:
        ratios = contention_ratios(bench, group, ctx, args.busy, args.rounds)
        rows = contention_table(group.label, ratios)
        for row in rows:
            print("  " + " | ".join(row), flush=True)
        table += rows
    title = f"### Contention: quiet and with {args.busy} busy processes, {args.rounds} rounds"
    print("\n".join(["", title, "", *markdown_table(CONTENTION_HEAD, table)]), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# contention: the same timing quiet and with busy-looping processes on the cores


def contention_ratios(
    bench: Benchmark,
    group: Group,
    ctx: multiprocessing.context.BaseContext,
    busy: int,
    rounds: int,
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """lossplug ÷ anchor time ratios of ``group``, quiet and with ``busy`` busy processes.

    Each round times the group once quiet and once busy (each in a fresh child, calls
    interleaved round-robin), so slow drifts in other load hit both alike. Returns
    ``{(ours, anchor, n_busy): {"ratios": [...], "ours_ms": [...], "anchor_ms": [...],
    "load": [...]}}``.
    """
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for _ in range(max(1, rounds)):
        for n_busy in (0, busy):
            with busy_processes(n_busy):
                timed = run_in_child(measure_times, (bench, group), ctx)
                load = loadavg().split()[0]
            medians = {impl: statistics.median(ts) for impl, ts in timed["times"].items() if ts}
            for ours, anchors in bench.pairs(group).items():
                for anchor in anchors:
                    if ours not in medians or anchor not in medians:
                        continue
                    row = out.setdefault(
                        (ours, anchor, n_busy),
                        {"ratios": [], "ours_ms": [], "anchor_ms": [], "load": []},
                    )
                    row["ratios"].append(medians[ours] / medians[anchor])
                    row["ours_ms"].append(1e3 * medians[ours])
                    row["anchor_ms"].append(1e3 * medians[anchor])
                    row["load"].append(load)
    return out
