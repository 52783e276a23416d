"""The business KPI of a Python→C++ translation fine-tune: how much faster, how often right.

A template for real use. Replace ``translate`` with your model's generation (the KPI passes the
training context, whose ``ctx.model`` is the model being fine-tuned, in eval mode), give it the
programs you care about, and add the KPI to a Trainer:

    trainer = Trainer(callbacks=[lossplug.LossMonitor(), lossplug.KPIMonitor([speedup])], ...)

Each program carries several inputs, none of them shown to the model: a translation is correct
only if it matches the reference on all of them. Here the "model" returns canned translations
(one fast and right, one wrong, one that does not compile), so the script runs as is and shows
what gets logged: PIE's share correct, share optimised and mean speed-up (a failure counts as
1.0x), beside the geometric mean over the correct translations only:

    python examples/code_speedup.py
"""

from __future__ import annotations

import argparse

from lossplug.kpi import KPIContext, KPIRunner
from lossplug.kpi.builtin import CodeSpeedup

COLLATZ_PY = """\
n = int(input())
longest, best = 0, 1
for start in range(1, n):
    x, steps = start, 0
    while x != 1:
        x = x // 2 if x % 2 == 0 else 3 * x + 1
        steps += 1
    if steps > longest:
        longest, best = steps, start
print(best, longest)
"""

COLLATZ_CPP = r"""
#include <cstdio>
int main() {
    long long n; if (std::scanf("%lld", &n) != 1) return 1;
    long long longest = 0, best = 1;
    for (long long start = 1; start < n; ++start) {
        long long x = start, steps = 0;
        while (x != 1) { x = (x % 2 == 0) ? x / 2 : 3 * x + 1; ++steps; }
        if (steps > longest) { longest = steps; best = start; }
    }
    std::printf("%lld %lld\n", best, longest);
}
"""

PRIMES_PY = """\
n = int(input())
sieve = bytearray([1]) * (n + 1)
sieve[0:2] = b"\\x00\\x00"
for i in range(2, int(n ** 0.5) + 1):
    if sieve[i]:
        sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
print(sum(sieve))
"""

PRIMES_CPP_WRONG = r"""
#include <cstdio>
#include <vector>
int main() {
    long long n; if (std::scanf("%lld", &n) != 1) return 1;
    std::vector<char> sieve(n + 1, 1);
    long long count = 0;
    for (long long i = 2; i <= n; ++i) {   // forgets to mark composites: counts every number
        if (sieve[i]) ++count;
    }
    std::printf("%lld\n", count);
}
"""

FIB_PY = """\
n = int(input())
a, b = 0, 1
for _ in range(n):
    a, b = b, (a + b) % 1_000_000_007
print(a)
"""

FIB_CPP_BROKEN = r"""
#include <cstdio>
int main() {
    long long n; std::scanf("%lld", &n);
    long long a = 0, b = 1
    for (long long i = 0; i < n; ++i) { long long t = (a + b) % 1000000007; a = b; b = t; }
    std::printf("%lld\n", a);
}
"""

PROGRAMS = [
    {"python": COLLATZ_PY, "inputs": ["100000\n", "54321\n", "2\n"]},
    {"python": PRIMES_PY, "inputs": ["2000000\n", "1000\n", "2\n"]},
    {"python": FIB_PY, "inputs": ["3000000\n", "10\n", "1\n"]},
]
CANNED = {COLLATZ_PY: COLLATZ_CPP, PRIMES_PY: PRIMES_CPP_WRONG, FIB_PY: FIB_CPP_BROKEN}


def translate(ctx: KPIContext, python_source: str) -> str:
    """Stand-in for the model: in real use, generate the C++ with ``ctx.model``."""
    return CANNED[python_source]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per program run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per program and input")
    args = parser.parse_args()

    speedup = CodeSpeedup(
        PROGRAMS,
        translate,
        program_timeout_s=args.timeout,
        repeats=args.repeats,
        every_n_steps=500,
    )
    runner = KPIRunner([speedup])  # what KPIMonitor does at each due step, without a Trainer
    outcome = runner.run(speedup, KPIContext(step=500))
    print("logged at step 500:")
    for key, value in sorted(outcome.metrics.items()):
        print(f"  {key:32s} {value:.4g}")
    isolation = {row["isolation"] for row in outcome.samples or []}
    # The translations are model-generated, untrusted code: they ran in the namespace sandbox.
    print(
        f"programs ran in: {', '.join(sorted(map(str, isolation)))} (sandbox={speedup.sandbox!r})"
    )
    print("samples table:")
    for row in outcome.samples or []:
        if row["correct"]:
            verdict = f"{row['speedup']:.1f}x faster (timings spread {row['spread']:.0%})"
        else:
            verdict = row["error"]
        print(f"  compiled={row['compiled']!s:5} correct={row['correct']!s:5} {verdict}")


if __name__ == "__main__":
    main()
