"""What the benchmarks share: inputs, timing, child processes, peak memory, verdicts, reports.

The CPU benchmarks ``cross_entropy.py``, ``metrics.py`` and ``linear_cross_entropy.py`` (run as
``python benchmarks/X.py``, which puts the ``benchmarks`` folder on ``sys.path``) each subclass
:class:`Benchmark` (their cases, anchors and tables) and :func:`run_benchmark` does the rest
(options, groups, child processes, ``--busy`` contention, report, ``--json``).
``callback_overhead.py`` shares the load policy and the report; ``gpu_suite.py`` the inputs, the
timing on a device (:func:`time_on_device`), the tables and the verdicts. The float64 references
are the tests' own, ``tests/_reference.py``.

Each CPU case's peak extra memory comes from one cold call in a child process of its own, so
memory an earlier case left mapped cannot hide it. Times are the median of repeated calls made
round-robin (the implementation under test and its anchors interleaved) in one child process per
group, so load from other processes hits all of them alike; that load is measured too.

The modules, each importing only those above it:

- ``cases``: :class:`Case`, :class:`Group`, :class:`Result` and the dtypes;
- ``inputs``: random logits and linear cross-entropy operands, the float64 reference;
- ``load``: the share of the CPU other processes use, the policy for a busy machine, busy loops;
- ``measure``: peak memory of a cold call, the clocks, interleaved and on-device timing, children;
- ``report``: header, footer, table cells, Markdown tables, verdicts, legend, ``--json``;
- ``benchmark``: the :class:`Benchmark` base class and :func:`run_benchmark`.

This package re-exports what the scripts use.
"""

from .benchmark import Benchmark, run_benchmark
from .cases import DTYPES, Case, Group, Result, last_error_line, rel_err
from .inputs import IGNORE, MiB, fill_logits, linear_inputs, reference
from .load import (
    add_load_options,
    background_meter,
    describe_policy,
    load_policy,
    loadavg,
    quietest,
)
from .measure import child_setup, cold_call, free, run_in_child, time_on_device
from .report import (
    anchor_ratios,
    fmt,
    header,
    legend,
    machine_info,
    markdown_table,
    mib,
    ms,
    pass_fail,
    pct,
    progress_line,
    ratio,
    verdict,
    version_of,
)

__all__ = [
    "DTYPES",
    "IGNORE",
    "Benchmark",
    "Case",
    "Group",
    "MiB",
    "Result",
    "add_load_options",
    "anchor_ratios",
    "background_meter",
    "child_setup",
    "cold_call",
    "describe_policy",
    "fill_logits",
    "fmt",
    "free",
    "header",
    "last_error_line",
    "legend",
    "linear_inputs",
    "load_policy",
    "loadavg",
    "machine_info",
    "markdown_table",
    "mib",
    "ms",
    "pass_fail",
    "pct",
    "progress_line",
    "quietest",
    "ratio",
    "reference",
    "rel_err",
    "run_benchmark",
    "run_in_child",
    "time_on_device",
    "verdict",
    "version_of",
]
