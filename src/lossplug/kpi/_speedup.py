r"""Speedup of a C++ translation over its Python source: the business KPI of a Python→C++ model.

:func:`measure_speedup` compiles the C++ program, runs it and the Python reference on the same
input under the same time and memory limits, checks that both print the same thing, and reports
how many times faster the C++ program is. Nothing the two programs do (fail to compile, crash,
loop forever, print the wrong answer) raises: the result says what went wrong. Only bad arguments
raise.

The programs a model writes are untrusted: the compiler, the compiled program and the Python
reference all run inside a Linux namespace sandbox (:mod:`lossplug.kpi._sandbox`) that sees no
other process, no network, no file outside a read-only view of the system and one private
directory, and no environment variable but ``PATH`` and ``LANG``. Where no sandbox can be built
the call raises :class:`SandboxUnavailableError`; ``sandbox="none"`` (or ``LOSSPLUG_SANDBOX=none``)
runs them unsandboxed, only under the resource limits, and only when asked.

Timing is CPU time (user + system) of the program's whole process tree (every process it
started, reaped or not: inside the sandbox the kernel reaps them all when the program exits, and
their time is added to it), read from ``os.wait4``, not wall-clock time. The sandbox's own start-up
is measured once per process and subtracted.

Training and evaluation machines are shared: other processes competing for the cores stretch
wall-clock time by a varying amount, while the CPU time a program consumes stays nearly the same.
The cost is that time spent blocked (sleeping, waiting on a pipe) is not counted and the threads
and processes of a parallel program add up; neither matters for the single-threaded,
compute-bound programs translation benchmarks are made of, and a program cannot look faster by
handing its work to a child process. The time limit itself is wall-clock, so a program that
sleeps forever is stopped too. Both timings include process start-up (for Python, the
interpreter's: about 15 ms), which dominates for programs that run only a few milliseconds:
use inputs large enough that the program does real work.

The resource limits are applied with util-linux's ``prlimit`` where it is installed, and (without
a sandbox only) with a ``preexec_fn`` where it is not; :func:`_limits` explains why.

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
import dataclasses
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lossplug.kpi._sandbox import (
    SOURCE_DIR,
    Jail,
    SandboxUnavailableError,
    read_report,
    resolve_sandbox,
)

try:
    import resource
except ImportError:  # Windows: no rlimits, no process groups
    resource = None  # type: ignore[assignment]

__all__ = ["SandboxUnavailableError", "SpeedupResult", "check_sandbox", "measure_speedup"]

# Processes (threads included) a program or the compiler may have at once: a fork storm stops here.
_MAX_PROCESSES = 64
# Captured output is held in memory; a program printing in a tight loop until the time limit
# could otherwise fill the caller's memory, since a file-size limit does not apply to pipes.
_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
# Files the programs may write (they should write none).
_MAX_FILE_BYTES = 16 * 1024 * 1024
# A program that does almost nothing can report a CPU time of zero; dividing by this instead
# keeps the speedup finite.
_MIN_SECONDS = 1e-6
# Longest stretch of program output or compiler message quoted in an error.
_QUOTE_CHARS = 60
_ERROR_CHARS = 200
# Messages the C++ runtime (std::bad_alloc), glibc and CPython print when an allocation fails.
_OUT_OF_MEMORY_MARKERS = ("bad_alloc", "MemoryError", "Cannot allocate memory", "out of memory")


@dataclass(frozen=True)
class SpeedupResult:
    """Outcome of :func:`measure_speedup`.

    Attributes:
        compiled: The C++ program compiled.
        correct: The C++ program ran within the limits and printed what the Python program
            printed (after normalising trailing whitespace).
        speedup: ``python_seconds / cpp_seconds``; ``None`` unless ``correct``.
        python_seconds: CPU seconds of the Python program (the minimum over the repeats), or
            ``None`` if it was not run or did not finish successfully.
        cpp_seconds: CPU seconds of the C++ program (the minimum over the repeats it finished),
            or ``None`` if it was not run or did not finish successfully. Set for a wrong answer
            too.
        error: Why the translation is not correct, in one short line; ``None`` when it is.
        isolation: How the programs ran: ``"bwrap"`` (in the namespace sandbox) or ``"none"``
            (asked for with ``sandbox="none"``: resource limits only).
    """

    compiled: bool
    correct: bool
    speedup: float | None
    python_seconds: float | None
    cpp_seconds: float | None
    error: str | None
    isolation: str = "none"


@dataclass(frozen=True)
class _Run:
    """One finished (or stopped) child process."""

    returncode: int
    stdout: bytes
    stderr: bytes
    cpu_seconds: float
    timed_out: bool
    output_overflow: bool
    start_error: str | None = None


def measure_speedup(
    python_source: str,
    cpp_source: str,
    *,
    stdin: str = "",
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
    shell, with ``stdin`` on the programs' standard input, a minimal environment (``PATH`` and
    ``LANG=C``), a wall-clock limit of ``timeout_s`` (the sandbox and everything in it are killed
    when it is reached), an address-space limit of ``memory_mb`` MiB (``compile_memory_mb`` for
    the compiler), a CPU-time limit just above ``timeout_s``, a file-size limit, at most 64
    processes and no core dumps. The programs can write only a private 64 MiB scratch directory, the
    compiler only the directory of the source. Python runs with the caller's interpreter in
    isolated mode (``-I``). Compile time is not measured, but is limited like a run.

    The standard outputs are compared line by line after removing trailing whitespace from each
    line and trailing empty lines. Times are CPU seconds (user + system) of each program's
    process; see the module docstring for why. With ``repeats > 1`` the two programs run
    alternately ``repeats`` times each and the minimum time of each is kept, which filters out
    one-off slowdowns.

    Args:
        python_source: The reference Python program.
        cpp_source: Its C++ translation (a complete program with ``main``).
        stdin: Text fed to both programs' standard input.
        timeout_s: Wall-clock limit of each run, in seconds; finite and > 0.
        memory_mb: Address-space limit of each run, in MiB; at least 16.
        compile_memory_mb: Address-space limit of the compiler, in MiB; at least 64. An ordinary
            program needs a few hundred MiB; a macro or template bomb can ask for many GiB.
        repeats: How many times to run each program; at least 1.
        compiler: The C++ compiler command, possibly with extra words (``"clang++ -march=native"``).
            Defaults to ``$CXX``, else ``g++``, else ``clang++``. In the sandbox it sees only the
            system directories (and its own installation, if outside ``/usr``) and no
            environment variable but ``PATH`` and ``LANG``.
        sandbox: ``"bwrap"`` (the namespace sandbox) or ``"none"`` (no isolation: the programs
            run as the caller, with only the resource limits; for trusted code or machines where
            no sandbox can be built). Defaults to ``$LOSSPLUG_SANDBOX``, else ``"bwrap"``.

    Returns:
        A :class:`SpeedupResult`. Compile errors, crashes, time-outs, memory exhaustion, wrong
        output and a failing Python reference are reported in it, not raised.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
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
    timeout_s = _validate(
        python_source, cpp_source, stdin, timeout_s, memory_mb, compile_memory_mb, repeats, compiler
    )
    isolation = resolve_sandbox(sandbox)
    if resource is None:
        raise OSError("measure_speedup needs POSIX resource limits, which this platform lacks")

    def failure(**fields: Any) -> SpeedupResult:
        return SpeedupResult(correct=False, speedup=None, isolation=isolation, **fields)

    compiler_command = _find_compiler(compiler)
    if compiler_command is None:
        tried = repr(compiler) if compiler is not None else "$CXX, g++ and clang++"
        return failure(compiled=False, error=f"no C++ compiler found (tried {tried})", **_NO_TIMES)
    jail = Jail.get(compiler_command) if isolation == "bwrap" else None
    python = _python_interpreter()
    if python is None:
        return failure(compiled=False, error="no Python interpreter found", **_NO_TIMES)

    # The private directory is a 0755 folder inside a 0700 one: other users of the host cannot
    # reach it, the sandbox's unprivileged user (which sees only the inner one) can.
    with tempfile.TemporaryDirectory(prefix="lossplug-speedup-") as tmp:
        box = _Box(
            Path(tmp) / "box",
            jail,
            compiler_command,
            python,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            compile_memory_mb=compile_memory_mb,
        )
        box.write(python_source, cpp_source)

        compile_error = box.compile()
        if compile_error is not None:
            return failure(compiled=False, error=compile_error, **_NO_TIMES)

        stdin_bytes = stdin.encode("utf-8")
        expected: list[str] | None = None
        python_times: list[float] = []
        cpp_times: list[float] = []
        for _ in range(repeats):
            # Alternating the two programs spreads any change in machine load over both.
            python_run = box.run(box.python_argv, stdin_bytes)
            problem = _run_problem(python_run, timeout_s, memory_mb)
            if problem is not None:
                return failure(
                    compiled=True,
                    error=_shorten(f"Python reference failed: {problem}"),
                    python_seconds=None,
                    cpp_seconds=min(cpp_times, default=None),
                )
            python_times.append(python_run.cpu_seconds)
            if expected is None:
                expected = _normalise(python_run.stdout)

            cpp_run = box.run(box.cpp_argv, stdin_bytes)
            problem = _run_problem(cpp_run, timeout_s, memory_mb)
            if problem is not None:
                return failure(
                    compiled=True,
                    error=_shorten(f"C++ {problem}"),
                    python_seconds=min(python_times),
                    cpp_seconds=min(cpp_times, default=None),
                )
            cpp_times.append(cpp_run.cpu_seconds)
            mismatch = _compare(expected, _normalise(cpp_run.stdout))
            if mismatch is not None:
                return failure(
                    compiled=True,
                    error=mismatch,
                    python_seconds=min(python_times),
                    cpp_seconds=min(cpp_times),
                )

    python_seconds = min(python_times)
    cpp_seconds = min(cpp_times)
    return SpeedupResult(
        compiled=True,
        correct=True,
        speedup=python_seconds / max(cpp_seconds, _MIN_SECONDS),
        python_seconds=python_seconds,
        cpp_seconds=cpp_seconds,
        error=None,
        isolation=isolation,
    )


_NO_TIMES: dict[str, Any] = {"python_seconds": None, "cpp_seconds": None}


class _Box:
    """One call's private directory, and how to compile and run its programs under the limits.

    With a :class:`Jail`, each step runs in a new sandbox where the directory is
    :data:`SOURCE_DIR`; without one (``sandbox="none"``), in the directory itself.
    """

    def __init__(
        self,
        directory: Path,
        jail: Jail | None,
        compiler_command: list[str],
        python: str,
        *,
        timeout_s: float,
        memory_mb: int,
        compile_memory_mb: int,
    ) -> None:
        directory.mkdir(mode=0o755)
        self.directory = directory
        self.jail = jail
        self.compiler_command = compiler_command
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.compile_memory_mb = compile_memory_mb
        # Where the programs see the directory: the sandbox shows it at SOURCE_DIR.
        self.seen = Path(SOURCE_DIR) if jail is not None else directory
        self.python_argv = [python, "-I", str(self.seen / "main.py")]
        self.cpp_argv = [str(self.seen / "main")]
        # The interpreter's installation and a compiler outside /usr must be visible inside.
        self.readable = [
            os.path.realpath(sys.base_prefix),
            os.path.dirname(python),
            _installation(compiler_command[0]),
        ]

    def write(self, python_source: str, cpp_source: str) -> None:
        (self.directory / "main.py").write_text(python_source, encoding="utf-8")
        (self.directory / "main.cpp").write_text(cpp_source, encoding="utf-8")
        for path in (self.directory / "main.py", self.directory / "main.cpp"):
            path.chmod(0o644)
        if self.jail is not None:
            self.jail.prepare(self.directory)

    def compile(self) -> str | None:
        """Compile ``main.cpp`` to ``main``; return ``None`` or why it failed."""
        binary = self.seen / "main"
        argv = [*self.compiler_command, "-O2", "-std=c++17", "-o", str(binary)]
        argv.append(str(self.seen / "main.cpp"))
        run = self._run(argv, b"", self.compile_memory_mb, writable=True)
        if run.start_error is not None:
            return _shorten(
                f"compile error: could not run {self.compiler_command[0]}: {run.start_error}"
            )
        if run.timed_out:
            return f"compile error: compiler timed out after {self.timeout_s} s"
        if run.returncode == 0 and (self.directory / "main").exists():
            return None
        # Quote paths relative to the private directory, which means nothing to the caller.
        messages = run.stderr.decode("utf-8", "replace").replace(f"{self.seen}{os.sep}", "")
        lines = [line.strip() for line in messages.splitlines() if line.strip()]
        first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
        if not first_error:
            if run.returncode == -signal.SIGKILL or run.returncode == -signal.SIGXCPU:
                first_error = f"compiler stopped at its CPU time limit of {self.timeout_s} s"
            else:
                first_error = f"compiler exited with code {run.returncode}"
        if any(marker in first_error for marker in _OUT_OF_MEMORY_MARKERS):
            first_error = (
                f"compiler memory limit exceeded ({self.compile_memory_mb} MiB): {first_error}"
            )
        return _shorten(f"compile error: {first_error}")

    def run(self, argv: Sequence[str], stdin: bytes) -> _Run:
        return self._run(argv, stdin, self.memory_mb, writable=False)

    def _run(self, argv: Sequence[str], stdin: bytes, memory_mb: int, *, writable: bool) -> _Run:
        # A fixed, minimal environment, so that neither the caller's secrets nor its PYTHON*
        # variables or locale reach the programs or change what they print.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"}
        if self.jail is None:
            prefix, preexec = _limits(self.timeout_s, memory_mb)
            return _run([*prefix, *argv], stdin, self.timeout_s, self.directory, env, preexec)
        limits = _limit_options(_limit_values(self.timeout_s, memory_mb))
        read_fd, write_fd = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        lifeline = [lifeline_write]

        def cut_lifeline() -> None:
            # Ends the sandbox at once: bwrap's death alone does not reach a sandbox that runs
            # as another user (see the launcher).
            with contextlib.suppress(IndexError, OSError):
                os.close(lifeline.pop())

        try:
            command, fds = self.jail.command(
                argv,
                limits=limits,
                report_fd=write_fd,
                lifeline_fd=lifeline_read,
                source_dir=self.directory,
                writable_source=writable,
                readable=self.readable,
            )
            run = _run(
                command,
                stdin,
                self.timeout_s,
                self.directory,
                env,
                None,
                pass_fds=fds,
                end_sandbox=cut_lifeline,
            )
            os.close(write_fd)
            write_fd = -1
            report = read_report(read_fd)
        finally:
            cut_lifeline()
            for fd in (read_fd, lifeline_read, write_fd):
                if fd >= 0:
                    os.close(fd)
        if report is None:  # killed at the time limit, or the sandbox could not start it
            return run
        # The launcher saw the program end: its own status and the CPU time of its whole tree.
        return dataclasses.replace(
            run, returncode=report.returncode, cpu_seconds=report.cpu_seconds
        )


def check_sandbox(sandbox: str | None = None, compiler: str | None = None) -> str:
    """The isolation :func:`measure_speedup` will use with these arguments, checked now.

    Builds the sandbox once (as the first call would), so that a machine where none can be
    built is found out before training, not at the first evaluation.

    Returns:
        ``"bwrap"`` or ``"none"``.

    Raises:
        TypeError, ValueError: ``sandbox`` (or ``$LOSSPLUG_SANDBOX``) names no isolation.
        SandboxUnavailableError: the sandbox is asked for and cannot be built here.
    """
    isolation = resolve_sandbox(sandbox)
    compiler_command = _find_compiler(compiler)
    # Without a compiler each call reports that itself; there is nothing to build the sandbox with.
    if isolation == "bwrap" and compiler_command is not None:
        Jail.get(compiler_command)
    return isolation


def _python_interpreter() -> str | None:
    """The real interpreter behind ``sys.executable`` (a venv's python is a link to it)."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    if not executable:
        return None
    return os.path.realpath(executable)


def _installation(program: str) -> str:
    """The installation directory of ``program`` (the folder above its ``bin``)."""
    real = os.path.dirname(os.path.realpath(program))
    return os.path.dirname(real) if os.path.basename(real) == "bin" else real


def _validate(
    python_source: object,
    cpp_source: object,
    stdin: object,
    timeout_s: object,
    memory_mb: object,
    compile_memory_mb: object,
    repeats: object,
    compiler: object,
) -> float:
    """Raise on a bad argument; return ``timeout_s`` as a float."""
    for name, value in (
        ("python_source", python_source),
        ("cpp_source", cpp_source),
        ("stdin", stdin),
    ):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    check_limits(timeout_s, memory_mb, compile_memory_mb, repeats, compiler)
    return float(timeout_s)  # type: ignore[arg-type]


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


def _find_compiler(compiler: str | None) -> list[str] | None:
    """The compiler command as an argument list with an absolute program path, or ``None``."""
    if compiler is not None:
        candidates = [compiler]
    else:
        # $CXX may be set but empty in CI images; treat that as unset.
        candidates = [c for c in (os.environ.get("CXX", ""), "g++", "clang++") if c.strip()]
    for candidate in candidates:
        try:
            words = shlex.split(candidate)
        except ValueError:  # unbalanced quotes
            continue
        program = shutil.which(words[0]) if words else None
        if program is not None:
            return [program, *words[1:]]
    return None


def _limits(timeout_s: float, memory_mb: int) -> tuple[list[str], Callable[[], None] | None]:
    """How to start a program under the resource limits: a command prefix, or a ``preexec_fn``.

    The limits are applied by running the program through util-linux's ``prlimit``, which sets
    them on itself and then executes the program in the same process. A ``preexec_fn`` is the
    fallback where ``prlimit`` is missing (macOS, minimal images). ``prlimit`` is preferred
    because a ``preexec_fn`` makes ``subprocess`` fork the whole caller and run Python code in
    the child, instead of a cheap ``vfork``: the Python documentation warns that this can
    deadlock in a multi-threaded caller (a training loop with logger threads), and the CPU time
    the child spends before and during ``exec`` (copy-on-write faults, tearing down the copied
    address space) is charged to the measured program. With 1 GiB of tensors in the caller
    that is about 19 ms per run, against under 1 ms through ``prlimit``, and it grows with the
    caller's memory.
    """
    limits = _limit_values(timeout_s, memory_mb)
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        return [prlimit, *_limit_options(limits), "--"], None

    def apply_limits() -> None:
        for _, which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))

    return [], apply_limits


def _limit_values(timeout_s: float, memory_mb: int) -> list[tuple[str, int, int, int]]:
    """The limits of one run: ``(name for prlimit, resource, soft limit, hard limit)``."""
    assert resource is not None
    wanted = [
        ("as", resource.RLIMIT_AS, memory_mb * 1024 * 1024, memory_mb * 1024 * 1024),
        # A backstop to the wall-clock limit, for when the caller is itself stopped and cannot
        # kill the program: the soft limit sends SIGXCPU, the hard one, a second later, SIGKILL.
        ("cpu", resource.RLIMIT_CPU, math.ceil(timeout_s) + 1, math.ceil(timeout_s) + 2),
        ("fsize", resource.RLIMIT_FSIZE, _MAX_FILE_BYTES, _MAX_FILE_BYTES),
        ("core", resource.RLIMIT_CORE, 0, 0),
        ("nproc", resource.RLIMIT_NPROC, _MAX_PROCESSES, _MAX_PROCESSES),
    ]
    # Lowering a hard limit is always allowed, raising it is not: never ask for more than the
    # caller's own hard limit, or the program cannot start.
    limits: list[tuple[str, int, int, int]] = []
    for name, which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((name, which, soft, hard))
    return limits


def _limit_options(limits: Sequence[tuple[str, int, int, int]]) -> list[str]:
    return [f"--{name}={soft}:{hard}" for name, _, soft, hard in limits]


def _run(
    command: Sequence[str],
    stdin: bytes,
    timeout_s: float,
    cwd: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None,
    pass_fds: Sequence[int] = (),
    end_sandbox: Callable[[], None] | None = None,
) -> _Run:
    """Run ``command`` in its own session under a wall-clock limit; return its output and time.

    ``subprocess.run`` does not fit: it kills only the direct child on a time-out (leaving
    anything it started running, and holding the pipes open), and it reaps the child with
    ``waitpid``, which discards the resource usage that ``os.wait4`` returns.

    ``end_sandbox``, for a sandboxed command, ends the sandbox from inside (its launcher kills
    everything and exits, so bwrap exits too and reaps it); the process group is killed only if
    that has not worked a second later, since a sandbox orphaned by its bwrap would be left for
    the host's init to reap.
    """
    try:
        process = _start(command, cwd, env, preexec_fn, pass_fds)
    except (OSError, subprocess.SubprocessError) as exc:
        # Not executable, a limit too low for exec itself, ...
        return _Run(-1, b"", b"", 0.0, timed_out=False, output_overflow=False, start_error=str(exc))
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    lock = threading.Lock()
    stopped = {"timed_out": False, "overflow": False}

    backstop = threading.Timer(1.0, _kill_group, args=(process.pid,))
    backstop.daemon = True

    def stop(reason: str) -> None:
        with lock:
            stopped[reason] = True
            if end_sandbox is None:
                _kill_group(process.pid)
            elif not backstop.is_alive():
                end_sandbox()
                backstop.start()

    stdout_chunks: list[bytes] = []
    stderr_chunks: list[bytes] = []
    # Threads, not selectors: the main thread has to block in wait4 to get the resource usage.
    threads = [
        threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True),
        threading.Thread(
            target=_drain,
            args=(process.stdout, stdout_chunks, lambda: stop("overflow")),
            daemon=True,
        ),
        threading.Thread(
            target=_drain,
            args=(process.stderr, stderr_chunks, lambda: stop("overflow")),
            daemon=True,
        ),
    ]
    timer = threading.Timer(timeout_s, stop, args=("timed_out",))
    timer.daemon = True
    reaped = False
    try:
        for thread in threads:
            thread.start()
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        reaped = True
    finally:
        timer.cancel()
        with lock:
            backstop.cancel()  # the leader is reaped: its pid may be reused from now on
        # Whatever the leader left behind (a forked child still holding the pipes open) goes
        # too; and if wait4 was interrupted (KeyboardInterrupt), the leader is killed and
        # reaped here rather than left running.
        if end_sandbox is not None:
            end_sandbox()
        if not reaped or end_sandbox is None:
            _kill_group(process.pid)
        if not reaped:
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
        join_deadline = time.monotonic() + 5.0
        for thread, stream in zip(
            threads, (process.stdin, process.stdout, process.stderr), strict=True
        ):
            thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
            # A descendant that escaped the process group (by starting its own session) can
            # hold a pipe open forever. Leave that stream to its thread: closing it under a
            # blocked read would let the thread read from whatever file reuses the descriptor.
            if not thread.is_alive():
                stream.close()
    returncode = os.waitstatus_to_exitcode(status)
    # Popen must not try to reap the process again: the pid is no longer ours.
    process.returncode = returncode
    with lock:
        # The timer may fire just as the program exits on its own; only a kill counts.
        # A sandbox ended through its lifeline exits with the launcher's code 124.
        killed = returncode == -signal.SIGKILL or (end_sandbox is not None and returncode == 124)
        timed_out = stopped["timed_out"] and killed
        overflow = stopped["overflow"]
    return _Run(
        returncode=returncode,
        stdout=b"".join(stdout_chunks),
        stderr=b"".join(stderr_chunks),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out,
        output_overflow=overflow,
    )


def _start(
    command: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        # A new session makes the child the leader of a new process group, so one killpg stops
        # the program and everything it started.
        start_new_session=True,
        preexec_fn=preexec_fn,
        pass_fds=tuple(pass_fds),
        bufsize=0,
    )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signal.SIGKILL)


def _feed(stream: IO[bytes], data: bytes) -> None:
    """Write ``data`` to the child's stdin and close it, so it sees end of input."""
    try:
        view = memoryview(data)
        while view:
            # An unbuffered pipe may take only part of the data in one write.
            written = stream.write(view)
            view = view[written:]
    except OSError:  # the program exited without reading all of its input; that is its business
        pass
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _drain(stream: IO[bytes], chunks: list[bytes], on_overflow: Callable[[], None]) -> None:
    """Read ``stream`` to its end, keeping at most ``_MAX_OUTPUT_BYTES``."""
    kept = 0
    overflowed = False
    while True:
        try:
            chunk = stream.read(65536)
        except (OSError, ValueError):  # the pipe broke: keep what was read
            return
        if not chunk:
            return
        if overflowed:
            continue  # keep reading so the child is not blocked on a full pipe until killed
        if kept + len(chunk) > _MAX_OUTPUT_BYTES:
            overflowed = True
            on_overflow()
            continue
        chunks.append(chunk)
        kept += len(chunk)


def _run_problem(run: _Run, timeout_s: float, memory_mb: int) -> str | None:
    """Why a run did not finish successfully, or ``None`` if it did."""
    if run.start_error is not None:
        return f"could not start: {run.start_error}"
    if run.timed_out:
        return f"timed out after {timeout_s} s"
    if run.output_overflow:
        return f"printed more than {_MAX_OUTPUT_BYTES // (1024 * 1024)} MiB"
    if run.returncode == 0:
        return None
    stderr = run.stderr.decode("utf-8", "replace")
    if any(marker in stderr for marker in _OUT_OF_MEMORY_MARKERS):
        return f"memory limit exceeded ({memory_mb} MiB)"
    if run.returncode == -signal.SIGXCPU:
        # The CPU-time limit, reached before the wall-clock one (a multi-threaded program).
        return f"timed out (CPU time limit of {math.ceil(timeout_s) + 1} s)"
    if run.returncode < 0:
        try:
            name = signal.Signals(-run.returncode).name
        except ValueError:
            name = "unknown signal"
        reason = f"exited with code {run.returncode} ({name})"
    else:
        reason = f"exited with code {run.returncode}"
    # The last line of stderr is where a Python traceback names the exception.
    last_line = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"{reason}: {last_line}" if last_line else reason


def _normalise(output: bytes) -> list[str]:
    """Lines of ``output`` without trailing whitespace, without trailing empty lines."""
    lines = [line.rstrip() for line in output.decode("utf-8", "replace").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _compare(expected: list[str], actual: list[str]) -> str | None:
    """``None`` if the outputs match, else a short description of the first difference."""
    if expected == actual:
        return None
    # Pad the shorter output with None ("end of output") so a missing line is a difference too.
    length = max(len(expected), len(actual))
    padded_expected: list[str | None] = [*expected, *[None] * (length - len(expected))]
    padded_actual: list[str | None] = [*actual, *[None] * (length - len(actual))]
    index, want, got = next(
        (i, want, got)
        for i, (want, got) in enumerate(zip(padded_expected, padded_actual, strict=True))
        if want != got
    )
    where = "" if length == 1 else f" on line {index + 1}"
    return f"wrong answer{where}: expected {_quote(want)}, got {_quote(got)}"


def _quote(line: str | None) -> str:
    if line is None:
        return "end of output"
    if len(line) > _QUOTE_CHARS:
        line = line[: _QUOTE_CHARS - 3] + "..."
    return repr(line)


def _shorten(message: str) -> str:
    message = " ".join(message.split())  # one line, whatever the program printed
    if len(message) > _ERROR_CHARS:
        message = message[: _ERROR_CHARS - 3] + "..."
    return message
