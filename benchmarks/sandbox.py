"""What the namespace sandbox costs a ``measure_speedup`` call, beside the unsandboxed call.

Each round calls ``measure_speedup`` on the same small, correct translation twice, once with
``sandbox="bwrap"`` (lossplug's default) and once with ``sandbox="none"`` (the anchor: the same
compiler, programs and resource limits, without isolation), in alternating order, and keeps the
wall time of each call. A call compiles once and runs each program once, so it starts three
sandboxes. Reported: the median wall time of each, their difference (the sandbox's overhead per
call) and ratio, and the measured CPU seconds of the C++ program in each (the sandbox's launcher
counts the program's whole tree but not bwrap's set-up; in the sandbox the program may start
threads only).

    python benchmarks/sandbox.py [--rounds 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

from lossplug.kpi.sandbox import Sandbox, find_compiler
from lossplug.kpi.speedup import measure_speedup

PYTHON = "n = int(input())\nprint(sum(i * i for i in range(n)) % 1000003)\n"
CPP = r"""
#include <cstdio>
int main() {
    long long n, total = 0;
    if (std::scanf("%lld", &n) != 1) return 1;
    for (long long i = 0; i < n; ++i) total += i * i;
    std::printf("%lld\n", total % 1000003);
}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=100_000, help="loop length of both programs")
    parser.add_argument("--json", help="also write the raw times here")
    args = parser.parse_args(argv)

    compiler = find_compiler(None)
    assert compiler is not None, "no C++ compiler"
    start = time.perf_counter()
    built = Sandbox.get(compiler)  # built once per process: launcher compile and probe
    setup_s = time.perf_counter() - start
    stdin = f"{args.n}\n"
    times: dict[str, list[float]] = {"bwrap": [], "none": []}
    cpp_cpu: dict[str, list[float]] = {"bwrap": [], "none": []}
    for index in range(args.rounds + 1):
        order = ("bwrap", "none") if index % 2 == 0 else ("none", "bwrap")
        for sandbox in order:
            start = time.perf_counter()
            result = measure_speedup(PYTHON, CPP, stdin=stdin, sandbox=sandbox)
            elapsed = time.perf_counter() - start
            assert result.correct and result.isolation == sandbox, result
            if index > 0:  # the first round warms the compiler's files into the page cache
                times[sandbox].append(elapsed)
                cpp_cpu[sandbox].append(result.cpp_seconds)

    median = {name: statistics.median(values) for name, values in times.items()}
    overhead_ms = (median["bwrap"] - median["none"]) * 1e3
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# measure_speedup with and without the sandbox, {args.rounds} rounds")
    print(
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, bwrap {built.bwrap}, "
        f"{'root: a leased uid per call' if built.userns_fd is not None else 'non-root'}, "
        f"load {os.getloadavg()[0]:.2f}, {now:%Y-%m-%d %H:%M} UTC"
    )
    print(f"# one-time set-up per process (launcher build, probe): {setup_s * 1e3:.0f} ms")
    print()
    print('| | sandbox="bwrap" (lossplug) | sandbox="none" (anchor) | lossplug ÷ anchor |')
    print("|---|---|---|---|")
    print(
        f"| wall per call, median | {median['bwrap'] * 1e3:.0f} ms | {median['none'] * 1e3:.0f} ms "
        f"| {median['bwrap'] / median['none']:.2f}× |"
    )
    low = {name: min(values) for name, values in cpp_cpu.items()}
    print(
        f"| C++ CPU time, least | {low['bwrap'] * 1e3:.2f} ms | {low['none'] * 1e3:.2f} ms "
        f"| {low['bwrap'] / low['none']:.2f}× |"
    )
    print()
    print(
        f"sandbox overhead per call (3 sandboxes): {overhead_ms:.1f} ms "
        f"({overhead_ms / 3:.1f} ms per sandboxed step); target < 50 ms per call"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"times_s": times, "cpp_cpu_s": cpp_cpu, "setup_s": setup_s}, handle)
    sys.exit(0 if overhead_ms < 50 else 1)


if __name__ == "__main__":
    main()
