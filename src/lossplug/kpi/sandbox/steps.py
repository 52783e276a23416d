"""One speed-up measurement, step by step: compile the translation, run the reference, run it.

:class:`Steps` owns the call's private directory and knows, for each step, the command, the
resource limits and (in the sandbox) what the step sees: the compiler the system directories,
its installation and the C++ source; the reference the system directories, the interpreter's
installation and ``main.py``; the binary only itself, the shared libraries it links and the
loader's cache (no shell, no interpreter, no source). Without a sandbox (``sandbox="none"``) the
steps run in the directory itself, under the limits only. The toolchain they use is found here
too: :func:`find_compiler`, :func:`python_interpreter`, :func:`check_toolchain`.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     steps = Steps(Path(tmp) / "call", None, None, ["g++"], "python3",
    ...                   StepLimits(timeout_s=5.0, memory_mb=256, compile_memory_mb=1024))
    ...     steps.python_argv[-1].endswith("main.py")
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lossplug.kpi.sandbox.bwrap import SCRATCH_BYTES, SOURCE_DIR, Sandbox, View, check_installation
from lossplug.kpi.sandbox.cgroup import MemoryCgroup, memory_cgroup
from lossplug.kpi.sandbox.elf import needed_files
from lossplug.kpi.sandbox.limits import limit_options, limit_values, unsandboxed
from lossplug.kpi.sandbox.output import excerpt, shorten
from lossplug.kpi.sandbox.process import MAX_OUTPUT_BYTES, Run, run_process

__all__ = [
    "OUT_OF_MEMORY_MARKERS",
    "StepLimits",
    "Steps",
    "check_toolchain",
    "find_compiler",
    "installation",
    "python_directories",
    "python_interpreter",
    "run_problem",
]

# Messages the C++ runtime (std::bad_alloc), glibc and CPython print when an allocation fails.
OUT_OF_MEMORY_MARKERS = ("bad_alloc", "MemoryError", "Cannot allocate memory", "out of memory")
# The longest compiler message quoted.
_COMPILER_CHARS = 160


@dataclass(frozen=True)
class StepLimits:
    """The limits of every step of one call.

    Attributes:
        timeout_s: Wall-clock limit of each step, in seconds.
        memory_mb: Address-space limit of each program run, in MiB.
        compile_memory_mb: Address-space limit of the compiler, in MiB.
    """

    timeout_s: float
    memory_mb: int
    compile_memory_mb: int


class Steps:
    """One call's private directory, and how to compile and run its programs under the limits.

    Args:
        directory: A new directory to create for the call (inside a private one).
        sandbox: The sandbox, or ``None`` to run without one.
        uid: As root, the uid leased for this call (:meth:`Sandbox.identity`); else ``None``.
        compiler_command: The compiler, an absolute path and its extra words.
        python: The interpreter that runs the reference.
        limits: The limits of each step.
    """

    def __init__(
        self,
        directory: Path,
        sandbox: Sandbox | None,
        uid: int | None,
        compiler_command: list[str],
        python: str,
        limits: StepLimits,
    ) -> None:
        # The source and binary, and the reference, in separate folders: each step is shown
        # only its own.
        self.compile_dir = directory / "cpp"
        self.python_dir = directory / "py"
        self.sandbox, self.uid, self.limits = sandbox, uid, limits
        self.compiler_command = compiler_command
        self.seen_cpp = Path(SOURCE_DIR) if sandbox is not None else self.compile_dir
        seen_python = Path(SOURCE_DIR) if sandbox is not None else self.python_dir
        self.python_argv = [python, "-I", str(seen_python / "main.py")]
        self.cpp_argv = [str(self.seen_cpp / "main")]
        self._python_view = View(
            directories=python_directories(python),
            files=((str(self.python_dir / "main.py"), f"{SOURCE_DIR}/main.py"),),
        )
        self._compile_view = View(
            directories=(installation(compiler_command[0]),), writable=str(self.compile_dir)
        )
        self._cpp_view: View | None = None

    def write(self, python_source: str, cpp_source: str) -> None:
        """Create the directory and write both sources into it."""
        self.compile_dir.parent.mkdir(mode=0o755)
        for folder, name, text in (
            (self.compile_dir, "main.cpp", cpp_source),
            (self.python_dir, "main.py", python_source),
        ):
            folder.mkdir(mode=0o755)
            (folder / name).write_text(text, encoding="utf-8")
            (folder / name).chmod(0o644)
            if self.sandbox is not None:
                self.sandbox.prepare(folder, self.uid)

    def compile(self) -> str | None:
        """Compile ``main.cpp`` to ``main``; return ``None`` or why it failed."""
        binary = self.seen_cpp / "main"
        argv = [*self.compiler_command, "-O2", "-std=c++17", "-o", str(binary)]
        argv.append(str(self.seen_cpp / "main.cpp"))
        timeout_s, compile_memory_mb = self.limits.timeout_s, self.limits.compile_memory_mb
        run = self._run(argv, b"", compile_memory_mb, self._compile_view)
        if run.start_error is not None:
            return shorten(
                f"compile error: could not run {self.compiler_command[0]}: {run.start_error}"
            )
        if run.timed_out:
            return f"compile error: compiler timed out after {timeout_s} s"
        built = self.compile_dir / "main"
        # A regular file, never a link the compile step made: it is shown to the next step.
        if run.returncode == 0 and built.is_file() and not built.is_symlink():
            files = ((str(built), f"{SOURCE_DIR}/main"),)
            libraries = tuple((path, path) for path in needed_files(str(built)))
            self._cpp_view = View(
                system=False,
                files=files + libraries,
                threads_only=True,
                own_network=True,
                own_memory_cgroup=True,
            )
            return None
        # Quote paths relative to the private directory, which means nothing to the caller.
        messages = run.stderr.decode("utf-8", "replace").replace(f"{self.seen_cpp}{os.sep}", "")
        lines = [line.strip() for line in messages.splitlines() if line.strip()]
        first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
        if not first_error:
            if run.returncode in (-signal.SIGKILL, -signal.SIGXCPU):
                first_error = f"compiler stopped at its CPU time limit of {timeout_s} s"
            else:
                first_error = f"compiler exited with code {run.returncode}"
        else:
            # The compiler's words, not the program's output: a longer excerpt than a program's
            # (the compiler sees only its installation and the source, never a private file).
            first_error = excerpt(first_error.encode(), _COMPILER_CHARS)
            if any(marker in first_error for marker in OUT_OF_MEMORY_MARKERS):
                first_error = (
                    f"compiler memory limit exceeded ({compile_memory_mb} MiB): {first_error}"
                )
        return shorten(f"compile error: {first_error}")

    def run_python(self, stdin: bytes) -> Run:
        """Run the reference on ``stdin``."""
        return self._run(self.python_argv, stdin, self.limits.memory_mb, self._python_view)

    def run_cpp(self, stdin: bytes) -> Run:
        """Run the compiled program on ``stdin`` (call :meth:`compile` first)."""
        assert self._cpp_view is not None, "compile first"
        return self._run(self.cpp_argv, stdin, self.limits.memory_mb, self._cpp_view)

    def _run(self, argv: Sequence[str], stdin: bytes, memory_mb: int, view: View) -> Run:
        # A fixed, minimal environment, so that neither the caller's secrets nor its PYTHON*
        # variables or locale reach the programs or change what they print.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"}
        cwd = Path(view.writable) if view.writable is not None else self.compile_dir.parent
        timeout_s = self.limits.timeout_s
        if self.sandbox is None:
            prefix, preexec = unsandboxed(timeout_s, memory_mb)
            return run_process([*prefix, *argv], stdin, timeout_s, cwd, env, preexec)
        options = limit_options(limit_values(timeout_s, memory_mb))
        if self.sandbox.cgroup is None or not view.own_memory_cgroup:
            return self._sandboxed(argv, stdin, options, view, cwd, env, None)
        try:
            group = memory_cgroup(self.sandbox.cgroup, memory_mb * 1024 * 1024 + SCRATCH_BYTES)
            with group as made:
                run = self._sandboxed(argv, stdin, options, view, cwd, env, made)
                return dataclasses.replace(run, oom_killed=made.oom_killed())
        except OSError as exc:  # never run outside the memory cgroup the result reports
            return Run(-1, b"", b"", 0.0, False, False, start_error=f"memory cgroup: {exc}")

    def _sandboxed(
        self,
        argv: Sequence[str],
        stdin: bytes,
        options: Sequence[str],
        view: View,
        cwd: Path,
        env: dict[str, str],
        group: MemoryCgroup | None,
    ) -> Run:
        assert self.sandbox is not None
        timeout_s = self.limits.timeout_s

        def start(command: list[str], fds: tuple[int, ...], end: Callable[[], None]) -> Run:
            return run_process(
                command, stdin, timeout_s, cwd, env, None, pass_fds=fds, end_sandbox=end
            )

        run, ended = self.sandbox.launch(
            argv, start, limits=options, view=view, uid=self.uid, cgroup=group
        )
        if ended is None:  # killed at the time limit, or the sandbox could not start it
            return run
        # The launcher saw the program end: its own status, and the CPU time of its whole tree
        # and its wall time, neither counting the sandbox's set-up.
        return dataclasses.replace(
            run,
            returncode=ended.returncode,
            cpu_seconds=ended.cpu_seconds,
            wall_seconds=ended.wall_seconds,
        )


def run_problem(run: Run, timeout_s: float, memory_mb: int, *, trusted: bool) -> str | None:
    """Why a run did not finish successfully, or ``None`` if it did.

    Args:
        run: The finished run.
        timeout_s: Its time limit, for the message.
        memory_mb: Its memory limit, for the message.
        trusted: The program is the caller's reference: the last line of its standard error
            (a traceback's) is quoted. A translation's standard error is never quoted.
    """
    if run.start_error is not None:
        return f"could not start: {run.start_error}"
    if run.timed_out:
        return f"timed out after {timeout_s} s"
    if run.output_overflow:
        return f"printed more than {MAX_OUTPUT_BYTES // (1024 * 1024)} MiB"
    if run.returncode == 0:
        return None
    stderr = run.stderr.decode("utf-8", "replace")
    if run.oom_killed or any(marker in stderr for marker in OUT_OF_MEMORY_MARKERS):
        return f"memory limit exceeded ({memory_mb} MiB)"
    if run.returncode == -signal.SIGXCPU:
        # The CPU-time limit, reached before the wall-clock one (a multi-threaded program).
        return f"timed out (CPU time limit of {math.ceil(timeout_s) + 1} s)"
    if run.returncode == -signal.SIGSYS:
        return (
            "was stopped at a forbidden system call: the measured run may start threads but "
            "no process"
        )
    if run.returncode < 0:
        try:
            name = signal.Signals(-run.returncode).name
        except ValueError:
            name = "unknown signal"
        reason = f"exited with code {run.returncode} ({name})"
    else:
        reason = f"exited with code {run.returncode}"
    if not trusted:
        return reason
    # The last line of stderr is where a Python traceback names the exception.
    last_line = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"{reason}: {excerpt(last_line.encode())}" if last_line else reason


# --- The toolchain ------------------------------------------------------------------------------


def installation(program: str) -> str:
    """The installation directory of ``program`` (the folder above its ``bin``)."""
    real = os.path.dirname(os.path.realpath(program))
    return os.path.dirname(real) if os.path.basename(real) == "bin" else real


def python_directories(python: str) -> tuple[str, ...]:
    """The directories the reference's step shows: the base prefix and the interpreter's own."""
    return os.path.realpath(sys.base_prefix), os.path.dirname(python)


def find_compiler(compiler: str | None) -> list[str] | None:
    """The compiler command as an argument list with an absolute program path, or ``None``.

    Args:
        compiler: The command asked for; ``None`` for ``$CXX``, else ``g++``, else ``clang++``.
    """
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


def python_interpreter() -> str | None:
    """The real interpreter behind ``sys.executable`` (a venv's python is a link to it)."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    if not executable:
        return None
    return os.path.realpath(executable)


def check_toolchain(compiler: str, python: str) -> None:
    """Refuse a compiler or interpreter whose shown directories would show the home or cwd.

    Raises:
        ValueError: from :func:`~lossplug.kpi.sandbox.bwrap.check_installation`.
    """
    check_installation(
        installation(compiler),
        f"the C++ compiler {compiler}",
        "pass compiler='/path/to/g++' (or set $CXX) to a compiler installed there",
    )
    for directory in python_directories(python):
        check_installation(
            directory,
            f"the Python interpreter {python}",
            "run lossplug with a Python installed there (a virtual environment may live anywhere)",
        )
