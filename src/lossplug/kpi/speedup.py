r"""Speedup of a C++ translation over its Python source: the business KPI of a Python→C++ model.

:func:`measure_speedup` compiles the C++ program, runs it and the Python reference on the same
input under the same time and memory limits, checks that both print the same thing, and reports
how many times faster the C++ program is. Nothing the two programs do (fail to compile, crash,
loop forever, print the wrong answer) raises: the result says what went wrong. Only bad arguments
raise.

The programs a model writes are untrusted: the compiler, the compiled program and the Python
reference each run inside a Linux namespace sandbox (:mod:`lossplug.kpi.sandbox`) that sees no
other process, no network, only what its step needs (the compiled program: itself and its shared
libraries), no environment variable but ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR``, and no
writable memory that is not sized. Where no sandbox can be built the call raises
:class:`SandboxUnavailableError`; ``sandbox="none"`` (or ``LOSSPLUG_SANDBOX=none``) runs them
unsandboxed, only under the resource limits, and only when asked.

Timing is CPU time (user + system) of the program's whole process tree, not wall-clock time; the
wall time is reported beside it. In the sandbox both are measured by the sandbox's launcher from
the moment it starts the program, so bwrap's set-up of the sandbox is in neither. There the
compiled program may start threads (their time adds up) but no process, so it cannot hide work in
a child whose time the kernel never reports (one reaped on its own when the parent ignores
``SIGCHLD``).

Training and evaluation machines are shared: other processes competing for the cores stretch
wall-clock time by a varying amount, while the CPU time a program consumes stays nearly the same.
The cost is that time spent blocked (sleeping, waiting on a pipe) is not counted and the threads
of a parallel program add up; neither matters for the single-threaded, compute-bound programs
translation benchmarks are made of. The time limit itself is wall-clock, so a program that
sleeps forever is stopped too. Timings still vary from run to run: with ``repeats`` the least
time of each program on each input is kept and the spread of the repeats is reported, so that a
speed-up within the noise can be told from a real one. Both timings include the program's own
start-up (for Python, the interpreter's), which dominates for programs that run only a few
milliseconds: use inputs large enough that the program does real work.

The resource limits are applied by the sandbox's launcher, or without a sandbox with util-linux's
``prlimit`` where it is installed and a ``preexec_fn`` where it is not
(:func:`lossplug.kpi.sandbox.limits.unsandboxed` explains why).

Example:
    >>> python_source = "n = int(input())\nprint(sum(i * i for i in range(n)))"
    >>> cpp_source = (
    ...     "#include <cstdio>\n"
    ...     "int main() {\n"
    ...     "    long long n, total = 0;\n"
    ...     '    std::scanf("%lld", &n);\n'
    ...     "    for (long long i = 0; i < n; ++i) total += i * i;\n"
    ...     '    std::printf("%lld\\n", total);\n'
    ...     "}\n"
    ... )
    >>> result = measure_speedup(python_source, cpp_source, stdin="1000\n")
    >>> result.compiled, result.correct, result.error
    (True, True, None)
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossplug.kpi.sandbox import (
    Run,
    Sandbox,
    SandboxUnavailableError,
    StepLimits,
    Steps,
    check_toolchain,
    compare,
    find_compiler,
    normalise,
    python_interpreter,
    resolve_sandbox,
    resource,
    run_problem,
    shorten,
)

__all__ = [
    "SandboxUnavailableError",
    "SpeedupResult",
    "check_limits",
    "check_sandbox",
    "measure_speedup",
]


# A program that does almost nothing can report a CPU time of zero; dividing by this instead
# keeps the speedup finite.
_MIN_SECONDS = 1e-6


@dataclass(frozen=True)
class SpeedupResult:
    """Outcome of :func:`measure_speedup`.

    Attributes:
        compiled: The C++ program compiled.
        correct: The C++ program ran within the limits and printed what the Python program
            printed (after normalising trailing whitespace), on every input.
        speedup: ``python_seconds / cpp_seconds``; ``None`` unless ``correct``.
        python_seconds: CPU seconds of the Python program: on each input the least over the
            repeats, summed over the inputs; ``None`` if it was not run or did not finish
            successfully.
        cpp_seconds: CPU seconds of the C++ program, the same way; ``None`` if it was not run or
            did not finish successfully. Set for a wrong answer too.
        error: Why the translation is not correct, in one short line; ``None`` when it is. It
            quotes at most 80 characters of the C++ program's output and never its standard
            error.
        isolation: How the programs ran: ``"bwrap"`` (in the namespace sandbox) or ``"none"``
            (asked for with ``sandbox="none"``: resource limits only).
        python_wall_seconds: Wall-clock seconds of the Python program, like ``python_seconds``.
        cpp_wall_seconds: Wall-clock seconds of the C++ program, like ``cpp_seconds``.
        spread: The largest relative spread of the repeated CPU times (``max / min - 1``) over
            both programs and all inputs: a speed-up is real only beyond ``1 + spread``.
            ``None`` with a single repeat.
        inputs: How many inputs both programs ran on.
        precomputable: The reference printed the same output for every one of two or more
            different inputs: a translation could print it without computing anything.
        memory_isolation: How the memory a program can hold is bounded: ``"cgroup"`` (the
            sandbox, and the C++ program's run in a memory cgroup of its own that counts every
            page, shared memory and tmpfs included), ``"sized"`` (the sandbox where no cgroup
            can be made: the address-space limit, a sized scratch tmpfs, everything else
            read-only, no shared memory), or ``"rlimit"`` (``sandbox="none"``: the
            address-space limit only). In the sandbox the programs have ``oom_score_adj`` 1000:
            the kernel kills them first.
    """

    compiled: bool
    correct: bool
    speedup: float | None
    python_seconds: float | None
    cpp_seconds: float | None
    error: str | None
    isolation: str = "none"
    python_wall_seconds: float | None = None
    cpp_wall_seconds: float | None = None
    spread: float | None = None
    inputs: int = 1
    precomputable: bool = False
    memory_isolation: str = "rlimit"


def measure_speedup(
    python_source: str,
    cpp_source: str,
    *,
    stdin: str | Sequence[str] = "",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    compile_memory_mb: int = 2048,
    repeats: int = 1,
    compiler: str | None = None,
    sandbox: str | None = None,
) -> SpeedupResult:
    r"""Compile and run a C++ translation and its Python source; report correctness and speedup.

    The C++ program is compiled at ``-O2 -std=c++17`` from a fresh private directory. The
    compiler and both programs each run in a new sandbox (see the module docstring), without a
    shell, with the input on the programs' standard input, a minimal environment (``PATH`` and
    ``LANG=C``; in the sandbox also ``HOME`` and ``TMPDIR``, the scratch directory), a
    wall-clock limit of ``timeout_s`` (the program and everything it started are killed when it
    is reached), an address-space limit of ``memory_mb`` MiB (``compile_memory_mb`` for the
    compiler), a CPU-time limit just above ``timeout_s``, a file-size limit, at most 64
    processes and threads, 256 open files and no core dumps. In the sandbox every step can write
    only a private 64 MiB in-memory scratch directory, the compiler also the directory of the
    source, and the compiled program may start threads but no process. Python runs with the
    interpreter behind the caller's (a virtual environment's base interpreter) in isolated mode
    (``-I``). Compile time is not measured, but is limited like a run.

    The standard outputs are compared line by line after removing trailing whitespace from each
    line and trailing empty lines. Times are CPU seconds (user + system); see the module
    docstring for why. On each input the two programs run alternately ``repeats`` times each
    and the least time of each is kept, which filters out one-off slowdowns.

    Args:
        python_source: The reference Python program.
        cpp_source: Its C++ translation (a complete program with ``main``).
        stdin: Text fed to both programs' standard input, or several such inputs: the
            translation is correct only if it matches the reference on every one.
        timeout_s: Wall-clock limit of each run, in seconds; finite and > 0.
        memory_mb: Address-space limit of each run, in MiB; at least 16.
        compile_memory_mb: Address-space limit of the compiler, in MiB; at least 64. An ordinary
            program needs a few hundred MiB; a macro or template bomb can ask for many GiB.
        repeats: How many times to run each program on each input; at least 1.
        compiler: The C++ compiler command, possibly with extra words (``"clang++ -march=native"``).
            Defaults to ``$CXX``, else ``g++``, else ``clang++``. In the sandbox it sees only the
            system directories, its own installation and the source, and no environment variable
            but ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR``.
        sandbox: ``"bwrap"`` (the namespace sandbox) or ``"none"`` (no isolation: the programs
            run as the caller, with only the resource limits; for trusted code or machines where
            no sandbox can be built). Defaults to ``$LOSSPLUG_SANDBOX``, else ``"bwrap"``.

    Returns:
        A :class:`SpeedupResult`. Compile errors, crashes, time-outs, memory exhaustion, wrong
        output and a failing Python reference are reported in it, not raised.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, or (in the sandbox) the compiler or the
            interpreter is installed in a directory that is or contains the home or working
            directory, which the programs would then see.
        SandboxUnavailableError: The sandbox was asked for (the default) and cannot be built on
            this machine; the message says what is missing and how to opt out.
        OSError: The platform has no POSIX resource limits (Windows).

    Example:
        >>> result = measure_speedup(
        ...     "print(int(input()) * 2)",
        ...     "#include <cstdio>\n"
        ...     'int main() { int n; std::scanf("%d", &n); std::printf("%d\\n", n * 3); }',
        ...     stdin="21\n",
        ... )
        >>> result.compiled, result.correct, result.speedup, result.error
        (True, False, None, "wrong answer: expected '42', got '63'")
    """
    timeout_s, inputs = _validate(
        python_source, cpp_source, stdin, timeout_s, memory_mb, compile_memory_mb, repeats, compiler
    )
    isolation = resolve_sandbox(sandbox)
    if resource is None:
        raise OSError("measure_speedup needs POSIX resource limits, which this platform lacks")
    memory_isolation = "rlimit"

    def failure(**fields: Any) -> SpeedupResult:
        return SpeedupResult(
            correct=False,
            speedup=None,
            isolation=isolation,
            memory_isolation=memory_isolation,
            inputs=len(inputs),
            **fields,
        )

    compiler_command = find_compiler(compiler)
    if compiler_command is None:
        tried = repr(compiler) if compiler is not None else "$CXX, g++ and clang++"
        return failure(compiled=False, error=f"no C++ compiler found (tried {tried})", **_NO_TIMES)
    python = python_interpreter()
    if python is None:
        return failure(compiled=False, error="no Python interpreter found", **_NO_TIMES)
    bwrap_sandbox = None
    if isolation == "bwrap":
        check_toolchain(compiler_command[0], python)
        bwrap_sandbox = Sandbox.get(compiler_command)
        memory_isolation = "cgroup" if bwrap_sandbox.cgroup is not None else "sized"

    # The private directory is a 0755 folder inside a 0700 one: other users of the host cannot
    # reach it, the sandbox's unprivileged user (which sees only the inner one) can.
    with (
        tempfile.TemporaryDirectory(prefix=f"lossplug-speedup-{os.getpid()}-") as tmp,
        bwrap_sandbox.identity() if bwrap_sandbox is not None else contextlib.nullcontext() as uid,
    ):
        limits = StepLimits(timeout_s, memory_mb, compile_memory_mb)
        steps = Steps(Path(tmp) / "call", bwrap_sandbox, uid, compiler_command, python, limits)
        steps.write(python_source, cpp_source)

        compile_error = steps.compile()
        if compile_error is not None:
            return failure(compiled=False, error=compile_error, **_NO_TIMES)

        timings = _Timings()

        def measured(program: str, stdin: bytes, index: int, where: str) -> Run | SpeedupResult:
            """One run of ``program`` on input ``index``, timed; the call's result if it failed."""
            trusted = program == "python"
            run = steps.run_python(stdin) if trusted else steps.run_cpp(stdin)
            problem = run_problem(run, timeout_s, memory_mb, trusted=trusted)
            if problem is None:
                timings.add(program, index, run.cpu_seconds, run.wall_seconds)
                return run
            error = (
                f"Python reference failed{where}: {problem}" if trusted else f"C++ {problem}{where}"
            )
            return failure(compiled=True, error=shorten(error), **timings.so_far(failed=program))

        outputs: set[bytes] = set()
        for index, text in enumerate(inputs):
            where = f" on input {index + 1} of {len(inputs)}" if len(inputs) > 1 else ""
            stdin_bytes = text.encode("utf-8")
            expected: bytes | None = None
            for _ in range(repeats):
                # Alternating the two programs spreads any change in machine load over both.
                python_run = measured("python", stdin_bytes, index, where)
                if isinstance(python_run, SpeedupResult):
                    return python_run
                if expected is None:
                    expected = normalise(python_run.stdout)
                    outputs.add(expected)
                del python_run  # its output, up to the cap, is not held twice

                cpp_run = measured("cpp", stdin_bytes, index, where)
                if isinstance(cpp_run, SpeedupResult):
                    return cpp_run
                mismatch = compare(expected, cpp_run.stdout, where)
                del cpp_run
                if mismatch is not None:
                    return failure(compiled=True, error=mismatch, **timings.so_far())

    python_seconds, cpp_seconds = timings.total("python"), timings.total("cpp")
    return SpeedupResult(
        compiled=True,
        correct=True,
        speedup=python_seconds / max(cpp_seconds, _MIN_SECONDS),
        python_seconds=python_seconds,
        cpp_seconds=cpp_seconds,
        error=None,
        isolation=isolation,
        python_wall_seconds=timings.total("python", wall=True),
        cpp_wall_seconds=timings.total("cpp", wall=True),
        spread=timings.spread() if repeats > 1 else None,
        inputs=len(inputs),
        precomputable=len(set(inputs)) > 1 and len(outputs) == 1,
        memory_isolation=memory_isolation,
    )


_NO_TIMES: dict[str, Any] = {"python_seconds": None, "cpp_seconds": None}


class _Timings:
    """CPU and wall seconds of each program's runs, per input."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], list[tuple[float, float]]] = {}

    def add(self, program: str, index: int, cpu: float, wall: float) -> None:
        self.runs.setdefault((program, index), []).append((cpu, wall))

    def total(self, program: str, *, wall: bool = False) -> float:
        """The least time on each input, summed over the inputs."""
        return sum(
            min(times[1] if wall else times[0] for times in runs)
            for (name, _), runs in self.runs.items()
            if name == program
        )

    def so_far(self, *, failed: str | None = None) -> dict[str, Any]:
        """The times of a call that stopped early; ``None`` for the program that ``failed``."""
        fields: dict[str, Any] = dict(_NO_TIMES)
        for program in ("python", "cpp"):
            if program != failed and any(name == program for name, _ in self.runs):
                fields[f"{program}_seconds"] = self.total(program)
                fields[f"{program}_wall_seconds"] = self.total(program, wall=True)
        return fields

    def spread(self) -> float:
        return max(
            max(cpu for cpu, _ in runs) / max(min(cpu for cpu, _ in runs), _MIN_SECONDS) - 1
            for runs in self.runs.values()
        )


def check_sandbox(sandbox: str | None = None, compiler: str | None = None) -> str:
    """The isolation :func:`measure_speedup` will use with these arguments, checked now.

    Builds the sandbox once (as the first call would), so that a machine where none can be
    built is found out before training, not at the first evaluation.

    Returns:
        ``"bwrap"`` or ``"none"``.

    Raises:
        TypeError, ValueError: ``sandbox`` (or ``$LOSSPLUG_SANDBOX``) names no isolation, or the
            compiler or interpreter would show the home or working directory to the sandbox.
        SandboxUnavailableError: the sandbox is asked for and cannot be built here.
    """
    isolation = resolve_sandbox(sandbox)
    compiler_command = find_compiler(compiler)
    python = python_interpreter()
    # Without a compiler each call reports that itself; there is nothing to build the sandbox with.
    if isolation == "bwrap" and compiler_command is not None:
        if python is not None:
            check_toolchain(compiler_command[0], python)
        Sandbox.get(compiler_command)
    return isolation


def _validate(
    python_source: object,
    cpp_source: object,
    stdin: object,
    timeout_s: object,
    memory_mb: object,
    compile_memory_mb: object,
    repeats: object,
    compiler: object,
) -> tuple[float, list[str]]:
    """Raise on a bad argument; return ``timeout_s`` as a float and the inputs as a list."""
    for name, value in (("python_source", python_source), ("cpp_source", cpp_source)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    inputs = [stdin] if isinstance(stdin, str) else stdin
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, str) for x in inputs):
        raise TypeError(f"stdin must be a str or a list of str, got {type(stdin).__name__}")
    if not inputs:
        raise ValueError("stdin must hold at least one input, got an empty list")
    check_limits(timeout_s, memory_mb, compile_memory_mb, repeats, compiler)
    return float(timeout_s), list(inputs)  # type: ignore[arg-type]


def check_limits(
    timeout_s: object,
    memory_mb: object,
    compile_memory_mb: object,
    repeats: object = 1,
    compiler: object = None,
    *,
    timeout_name: str = "timeout_s",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first limit that is out of range."""
    # bool is an int subclass, but timeout_s=True is a bug, not one second.
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"{timeout_name} must be a number, got {type(timeout_s).__name__}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"{timeout_name} must be a finite number > 0, got {timeout_s!r}")
    for name, value, minimum in (
        ("memory_mb", memory_mb, 16),
        ("compile_memory_mb", compile_memory_mb, 64),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if compiler is not None:
        if not isinstance(compiler, str):
            raise TypeError(f"compiler must be a str or None, got {type(compiler).__name__}")
        if not compiler.strip():
            raise ValueError(f"compiler must name a command, got {compiler!r}")
