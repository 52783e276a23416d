"""benchmarks/gpu_suite.py: one PASS/FAIL line per target at the end, and the --quick mode."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite

sys.path.pop(0)

Check, Timing = gpu_suite.Check, gpu_suite.Timing


def _timing(impl: str, mode: str, ms: float | None, floor: float, peak: int | None = None):
    return Timing(impl, mode, [] if ms is None else [ms], peak, floor, note="" if ms else "n/a")


def test_one_line_per_target_with_its_verdict():
    checks = [Check("c", "loss", 1.0, 1.0, 0.0, 1e-6), Check("c", "nll", 1.0, 1.0, 1e-3, 1e-6)]
    lce_checks = [Check("l", "loss", 1.0, 1.0, 0.0, 1e-6)]
    mib = 2**20
    timings = [
        _timing("lossplug-triton", "fwd+bwd", 1.5, 1.4),  # 1.07x floor: within 1.3x
        _timing("lossplug-triton", "stats", 0.9, 0.7),  # 1.29x: over 1.2x
        _timing("liger CrossEntropyLoss", "fwd+bwd", 2.0, 1.4),
        _timing("lossplug (torch backend)", "fwd+bwd", 40.0, 32.0, 900 * mib),
        _timing("lossplug (triton)", "fwd+bwd", 250.0, 32.0, 500 * mib),
        _timing("CCE linear_cross_entropy (cce)", "fwd+bwd", None, 32.0),
    ]
    lines = gpu_suite.target_lines(checks, lce_checks, timings, tiny=False)
    assert lines == [
        "FAIL  correctness cross-entropy: 1/2 checks",
        "PASS  correctness linear cross-entropy: 1/1 checks",
        "PASS  CE fwd+bwd <= 1.3x floor: 1.07x floor",
        "FAIL  CE stats <= 1.2x floor: 1.29x floor",
        "PASS  CE fwd+bwd faster than Liger CE: 1.500 vs 2.000 ms",
        "PASS  linear CE fwd+bwd lossplug (torch backend) <= 1.4x floor: 1.25x floor",
        "N/A   linear CE peak extra memory lossplug (torch backend) <= CCE's (n/a)",
        "FAIL  linear CE fwd+bwd lossplug (triton) <= 1.4x floor: 7.81x floor",
        "N/A   linear CE peak extra memory lossplug (triton) <= CCE's (n/a)",
    ]
    timings[-1] = _timing("CCE linear_cross_entropy (cce)", "fwd+bwd", 30.0, 32.0, 600 * mib)
    lines = gpu_suite.target_lines(checks, lce_checks, timings, tiny=False)
    assert (
        "FAIL  linear CE peak extra memory lossplug (torch backend) <= CCE's: 900 vs 600 MiB"
        in lines
    )
    assert "PASS  linear CE peak extra memory lossplug (triton) <= CCE's: 500 vs 600 MiB" in lines
    # on the CPU the timings mean nothing against GPU floors: skipped, not failed
    tiny = gpu_suite.target_lines(checks, lce_checks, timings, tiny=True)
    assert [line.split()[0] for line in tiny] == ["FAIL", "PASS"] + ["SKIP"] * 5


def test_quick_leaves_out_the_largest_correctness_case(monkeypatch):
    cases = []
    # the cases run, not their (interpreted, slow) checks
    monkeypatch.setattr(gpu_suite, "check_case", lambda name, *a, **k: cases.append(name) or [])
    cpu = torch.device("cpu")
    gpu_suite.run_correctness(cpu, tiny=True)
    full, cases[:] = set(cases), []
    gpu_suite.run_correctness(cpu, tiny=True, quick=True)
    assert set(cases) < full and len(full - set(cases)) == 1
    assert all("80x777" in case for case in full - set(cases))
