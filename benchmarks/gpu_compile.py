"""Compile every Triton kernel of lossplug for real GPUs, on any machine (no GPU needed).

Each op's own launch code runs on ``meta`` tensors at the DESIGN shapes with its kernels swapped
for recorders, so what gets compiled is exactly what a CUDA launch would compile: the same block
sizes, ``num_warps`` and constexprs (chosen by ``launch_params`` in ``lossplug/ops/_triton/``),
and the same signature and divisibility attributes (Triton's own argument binder). Every
specialization the ops can launch is covered: logits/hidden dtype fp32, bf16 and fp16; softcap,
label smoothing, bias and the gradient flags on and off (and with ``--all-blocks`` every
``BLOCK_V`` the cross-entropy launch can pick for smaller vocabularies). Each is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and its cubin read by
the ``cuobjdump`` shipped with Triton: registers, spills (local memory), shared memory.

    python benchmarks/gpu_compile.py                       # sm_80 and sm_90, every kernel
    python benchmarks/gpu_compile.py --arch 90 --dtype bf16 --json rows.json

Exits 0 only when everything compiled with no spills. Needs TRITON_INTERPRET unset (or 0): the
interpreter replaces the kernels by Python functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# DESIGN's shapes: CE [8192, 128256]; linear CE N=8192, D=4096, V=128256
TOKENS, HIDDEN, VOCAB = 8192, 4096, 128256
DTYPES = ("fp32", "bf16", "fp16")
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


@dataclass
class Job:
    """One kernel specialization to compile, as the launch code would launch it."""

    module: str
    kernel: str
    dtype: str
    specialization: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    # every option off, or every one on (and every gradient wanted): the --quick subset
    extreme: bool = False


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(module, names):
    recorders = {name: _Recorder(getattr(module, name)) for name in names}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        yield recorders
    finally:
        for name, recorder in recorders.items():
            setattr(module, name, recorder.fn)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _job(module, recorder, dtype: str, specialization: str, backend, extreme: bool) -> Job:
    """The signature, constexprs and attributes Triton's binder gives the recorded launch."""
    from triton.runtime.jit import create_function_from_signature

    (args, kwargs), *_ = recorder.calls
    recorder.calls.clear()
    fn = recorder.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, spec, _ = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, spec, None)
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return Job(
        module.__name__,
        fn.__name__,
        dtype,
        specialization,
        signature,
        constexprs,
        attrs,
        options,
        extreme,
    )


def _ce_jobs(dtypes, all_blocks: bool, backend) -> list[Job]:
    import importlib

    import torch

    from lossplug.ops._spec import LossSpec
    from lossplug.ops._triton import cross_entropy as ce

    # one vocabulary per block size the launch can pick (the DESIGN one alone by default)
    vocabs = {ce.launch_params(VOCAB, interpreted=False)["BLOCK_V"]: VOCAB}
    if all_blocks:
        for k in range(18):
            vocabs.setdefault(ce.launch_params(2**k, interpreted=False)["BLOCK_V"], 2**k)
    op = importlib.import_module("lossplug.ops.cross_entropy")  # the package exports a function
    jobs = []
    names = ("_ce_forward_kernel", "_ce_backward_kernel")
    with _recording(ce, names) as rec:
        for dtype, (block, vocab), softcap, smoothing in itertools.product(
            dtypes, sorted(vocabs.items()), (None, 30.0), (0.0, 0.1)
        ):
            meta = dict(device="meta")
            logits3 = op._as_rows(
                torch.empty(8, TOKENS // 8, vocab, dtype=_torch_dtype(dtype), **meta)
            )
            target = torch.empty(TOKENS, dtype=torch.int64, **meta)
            spec = LossSpec(-100, smoothing, 0.0, softcap)
            flags = f"BLOCK_V={block} softcap={softcap is not None}"
            rows = ce.forward(logits3, target, spec)
            extreme = (softcap is None) == (smoothing == 0.0) and vocab == VOCAB
            specialization = f"{flags} smoothing={smoothing > 0}"
            jobs.append(_job(ce, rec[names[0]], dtype, specialization, backend, extreme))
            if smoothing == 0.0:  # the backward has no smoothing constexpr: once is enough
                grad3 = torch.empty_like(logits3)
                ce.backward(logits3, target, rows.lse, rows.loss, spec, grad3)
                extreme = vocab == VOCAB
                jobs.append(_job(ce, rec[names[1]], dtype, flags, backend, extreme))
    return jobs


def _lce_jobs(dtypes, backend) -> list[Job]:
    import torch

    from lossplug.ops._spec import LossSpec
    from lossplug.ops._triton import linear_cross_entropy as lce

    jobs = []
    names = ("_lce_forward_kernel", "_lce_backward_kernel")
    meta = dict(device="meta")
    with _recording(lce, names) as rec:
        for dtype, has_bias, softcap in itertools.product(dtypes, (False, True), (None, 30.0)):
            dt = _torch_dtype(dtype)
            hidden = torch.empty(TOKENS, HIDDEN, dtype=dt, **meta)
            weight = torch.empty(VOCAB, HIDDEN, dtype=dt, **meta)
            bias = torch.empty(VOCAB, dtype=dt, **meta) if has_bias else None
            target = torch.empty(TOKENS, dtype=torch.int64, **meta)
            spec = LossSpec(-100, 0.0, 0.0, softcap)
            flags = f"bias={has_bias} softcap={softcap is not None}"
            rows, _ = lce.forward(hidden, weight, bias, target, spec, needs=None)
            extreme = has_bias == (softcap is not None)
            jobs.append(_job(lce, rec[names[0]], dtype, flags, backend, extreme))
            for needs in itertools.product((False, True), repeat=3):
                if not any(needs) or (needs[2] and not has_bias):
                    continue  # the launch skips these (nothing to compute)
                lce.backward(hidden, weight, bias, target, rows.lse, rows.loss, spec, needs)
                want = "".join(n for n, w in zip("hwb", needs, strict=True) if w)
                specialization = f"{flags} grads={want}"
                full = extreme and needs == (True, True, has_bias)
                jobs.append(_job(lce, rec[names[1]], dtype, specialization, backend, full))
    return jobs


def collect_jobs(dtypes=DTYPES, *, all_blocks: bool = False, quick: bool = False) -> list[Job]:
    """Every specialization the ops launch, from their own launch code (arch-independent)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jobs = _ce_jobs(dtypes, all_blocks, backend) + _lce_jobs(dtypes, backend)
    return [job for job in jobs if job.extreme] if quick else jobs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _blocks_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    # registers are allocated per warp in units of 256
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else 99
    by_warps = MAX_WARPS_PER_SM.get(arch, 64) // num_warps
    by_shared = SHARED_PER_SM.get(arch, 100 * 1024) // shared if shared else 99
    return min(by_regs, by_warps, by_shared, 32)


def compile_job(job: Job, arch: int) -> dict:
    """Compile ``job`` for ``sm_<arch>`` and read its resources from the cubin."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    row = dict(
        kernel=job.kernel.strip("_").removesuffix("_kernel"),
        arch=arch,
        dtype=job.dtype,
        specialization=job.specialization,
        num_warps=job.options.get("num_warps", 4),
    )
    start = time.perf_counter()
    try:
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            dump = subprocess.run(
                [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
            ).stdout
    except Exception as e:  # a failed compile is a row of the report
        return dict(row, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", dump))
    ptx = kernel.asm["ptx"]
    shared = int(usage.get("SHARED", 0)) + int(kernel.metadata.shared)
    registers = int(usage["REG"])
    return dict(
        row,
        registers=registers,
        spills=int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0)),
        shared=shared,
        blocks_per_sm=_blocks_per_sm(arch, registers, shared, row["num_warps"]),
        tensor_cores="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "",
        seconds=round(time.perf_counter() - start, 2),
    )


def _compile_star(item):
    return compile_job(*item)


def run(
    archs,
    dtypes=DTYPES,
    *,
    all_blocks: bool = False,
    quick: bool = False,
    jobs: int | None = None,
) -> list[dict]:
    """Compile every specialization for every arch; one row each (``error`` when it failed)."""
    found = collect_jobs(dtypes, all_blocks=all_blocks, quick=quick)
    work = [(job, arch) for arch in archs for job in found]
    workers = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if workers == 1:
        return [compile_job(*item) for item in work]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_star, work))


def ok(row: dict) -> bool:
    """Compiled, with no local memory (spills) at all."""
    return "error" not in row and row["spills"] == 0


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "sm", "dtype", "specialization", "warps", "regs", "spills", "shared",
            "blocks/SM", "tensor cores", "")  # fmt: skip
    lines = [head]
    for r in rows:
        if "error" in r:
            cells = (r["kernel"], r["arch"], r["dtype"], r["specialization"], r["num_warps"])
            lines.append((*map(str, cells), "-", "-", "-", "-", "-", "FAIL " + r["error"]))
            continue
        lines.append(tuple(map(str, (
            r["kernel"], r["arch"], r["dtype"], r["specialization"], r["num_warps"],
            r["registers"], r["spills"], r["shared"], r["blocks_per_sm"], r["tensor_cores"] or "-",
            "ok" if ok(r) else "SPILLS",
        ))))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="default: all three")
    parser.add_argument("--all-blocks", action="store_true", help="every BLOCK_V of CE, too")
    parser.add_argument(
        "--quick", action="store_true", help="per kernel only every option off and every one on"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (CPU count)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET (or set it to 0): interpreted kernels cannot compile")
    archs = args.arch or [80, 90]
    unknown = [a for a in archs if a < 75 or a > 120]
    if unknown:
        parser.error(f"--arch must be a compute capability such as 80 or 90, got {unknown}")
    folder = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if folder is not None and not os.path.isdir(folder):  # found out now, not after the compiles
        parser.error(f"--json {args.json!r}: folder {folder!r} does not exist")
    dtypes = tuple(args.dtype or DTYPES)
    rows = run(archs, dtypes, all_blocks=args.all_blocks, quick=args.quick, jobs=args.jobs)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not ok(r)]
    print(f"{len(rows) - len(bad)}/{len(rows)} kernels compiled with no spills", end="")
    print(f"; {len(bad)} failed" if bad else "")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
