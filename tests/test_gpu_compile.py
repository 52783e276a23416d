"""benchmarks/gpu_compile.py: the kernels compile for a real GPU (sm_90) on this CPU machine.

The tests run under TRITON_INTERPRET=1, where ``@triton.jit`` makes Python functions that cannot
be compiled, so the script runs in a subprocess without it (and with an empty Triton cache, so
the compiler really runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_compile.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def sm90_bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_compile")
    out = tmp / "rows.json"
    # one interpreter for the compile and the count of what would be compiled (imports are slow)
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu_compile as g; "
        f"rc = g.main(['--arch', '90', '--dtype', 'bf16', '--quick', '--json', {str(out)!r}]); "
        "jobs = g.collect_jobs(); print('collected', len(jobs), len({(j.kernel, j.dtype, "
        "j.specialization) for j in jobs}), len(g.collect_jobs(('bf16',), all_blocks=True))); "
        "sys.exit(rc)"
    )
    proc = _run(tmp, "-c", code)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_every_kernel_compiles_for_sm90_without_spills(sm90_bf16):
    proc, rows = sm90_bf16
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8/8 kernels compiled with no spills" in proc.stdout
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"ce_forward", "ce_backward", "lce_forward", "lce_backward"}
    for row in rows:
        assert "error" not in row, row
        assert (row["arch"], row["dtype"], row["spills"]) == (90, "bf16", 0)
        assert 0 < row["registers"] <= 255
        assert row["blocks_per_sm"] >= 1
    # the linear kernels' matmuls run on Hopper's tensor cores, the CE ones have no matmul
    assert {r["tensor_cores"] for r in rows if r["kernel"].startswith("lce")} == {"wgmma"}
    assert {r["tensor_cores"] for r in rows if r["kernel"].startswith("ce")} == {""}


def test_compiled_with_the_launch_codes_parameters(sm90_bf16):
    """What was compiled is what the launches pick on a GPU: no second copy of the parameters."""
    from lossplug.ops._triton import cross_entropy as ce
    from lossplug.ops._triton import linear_cross_entropy as lce

    _, rows = sm90_bf16
    ce_params = ce.launch_params(128256, interpreted=False)
    lce_params = lce.launch_params(interpreted=False)
    assert ce_params["BLOCK_V"] == 4096  # the GPU's block, not the interpreter's 16384
    for row in rows:
        params = ce_params if row["kernel"].startswith("ce") else lce_params
        assert row["num_warps"] == params["num_warps"]
        if row["kernel"].startswith("ce"):
            assert f"BLOCK_V={ce_params['BLOCK_V']}" in row["specialization"]
    # the interpreter is launched without num_warps and with its own larger blocks
    assert ce.launch_params(128256, interpreted=True) == {"BLOCK_V": 16384}
    assert "num_warps" not in lce.launch_params(interpreted=True)


def test_every_specialization_the_ops_launch_is_collected(sm90_bf16):
    proc, _ = sm90_bf16
    counts = next(line for line in proc.stdout.splitlines() if line.startswith("collected"))
    # per dtype: CE forward 2 softcap x 2 smoothing, backward 2 softcap; linear forward
    # 2 bias x 2 softcap, backward 3 gradient sets without bias and 7 with, x 2 softcap
    per_dtype = 4 + 2 + 4 + 2 * (3 + 7)
    # with every block: BLOCK_V 1, 2, ..., 4096 (13 sizes) for each CE specialization
    assert counts.split()[1:] == [str(3 * per_dtype)] * 2 + [str(13 * 6 + 4 + 20)]


def test_refuses_to_run_under_the_interpreter():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src")),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unset TRITON_INTERPRET" in proc.stderr


def test_a_spilling_or_failed_kernel_fails_the_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_compile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = dict(kernel="k", arch=90, dtype="bf16", specialization="", num_warps=8)
    good = dict(row, registers=40, spills=0, shared=0, blocks_per_sm=6, tensor_cores="")
    assert gpu_compile.ok(good)
    assert not gpu_compile.ok(dict(good, spills=16))
    assert not gpu_compile.ok(dict(row, error="CompilationError: boom"))
    table = gpu_compile.format_table([good, dict(good, spills=16), dict(row, error="boom")])
    assert [line.split()[-1] for line in table.splitlines()[1:]] == ["ok", "SPILLS", "boom"]
    # a register-bound 8-warp block: 255 registers leave room for one block per SM
    assert gpu_compile._blocks_per_sm(90, 255, 0, 8) == 1
    assert gpu_compile._blocks_per_sm(90, 40, 0, 8) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "9"], r"--arch must be a compute capability such as 80 or 90, got \[9\]"),
        (["--json", "/no/such/folder/rows.json"], r"--json '/no/such/folder/rows.json': folder"),
        (["--dtype", "float16"], r"--dtype: invalid choice: 'float16'"),
    ],
)
def test_obvious_mistakes_are_refused_before_compiling(args, message):
    import re

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr


def test_float32_linear_backward_compiles_without_spills_on_sm80_and_sm90(tmp_path):
    """The heaviest fp32 linear kernel (every gradient, bias, softcap) spilled 712 bytes on sm_80
    and 336 on sm_90 with the tiles then shared by every dtype; float32 now has its own."""
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import gpu_compile as g, torch; "
        "from lossplug.ops._triton import linear_cross_entropy as lce; "
        "jobs = [j for j in g.collect_jobs(('fp32', 'bf16')) if j.kernel.startswith('_lce')]; "
        "launched = {(j.dtype, j.kernel, json.dumps(j.options, sort_keys=True)) for j in jobs}; "
        "heavy = next(j for j in jobs if j.dtype == 'fp32' and "
        "j.specialization == 'bias=True softcap=True grads=hwb'); "
        "print(json.dumps(dict(launched=sorted(launched), "
        "params={d: lce.launch_params(getattr(torch, n), interpreted=False) "
        "for d, n in (('fp32', 'float32'), ('bf16', 'bfloat16'))}, "
        "rows=[g.compile_job(heavy, a) for a in (80, 90)])))"
    )
    proc = _run(tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    # each dtype is launched with its own parameters: what launch_params gives for it
    for dtype, kernel, options in out["launched"]:
        params = out["params"][dtype]
        assert json.loads(options) == {
            k: v for k, v in params.items() if k in ("num_warps", "num_stages")
        }, (dtype, kernel)
    assert out["params"]["fp32"]["BLOCK_D"] < out["params"]["bf16"]["BLOCK_D"]
    for row in out["rows"]:
        assert "error" not in row, row
        assert (row["dtype"], row["spills"]) == ("fp32", 0), row
        assert 0 < row["registers"] <= 255
