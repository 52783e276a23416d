"""The sandbox's launcher: built from ``launcher.c`` once per process, and what it reports.

The launcher is PID 1 of every sandbox (``launcher.c`` says what it does and why). It is
lossplug's own code, compiled outside the sandbox with the C++ compiler that
:func:`~lossplug.kpi.speedup.measure_speedup` needs anyway: ``launcher.c`` is written in the
common subset of C and C++, and is compiled as C++. When the program it started has ended, the
launcher writes one line to a pipe: how the program ended, the CPU time of its whole process
tree and its wall time (a :class:`ProgramExit`).

Example:
    >>> read_fd, write_fd = os.pipe()
    >>> _ = os.write(write_fd, b"signal 9 0.250000 1.000000\\n")
    >>> os.close(write_fd)
    >>> read_exit(read_fd)
    ProgramExit(returncode=-9, cpu_seconds=0.25, wall_seconds=1.0)
    >>> os.close(read_fd)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lossplug.kpi.sandbox.choice import SandboxUnavailableError

__all__ = ["LAUNCHER", "ProgramExit", "build_launcher", "read_exit", "sweep_leftovers"]

# The launcher's file name, in the directory build_launcher returns.
LAUNCHER = "launcher"


@dataclass(frozen=True)
class ProgramExit:
    """How a sandboxed program ended, as its launcher saw it.

    Attributes:
        returncode: The exit status, ``-n`` for signal ``n``.
        cpu_seconds: User and system time of the program and every process it started.
        wall_seconds: From the program's start to its end, without the sandbox's set-up.
    """

    returncode: int
    cpu_seconds: float
    wall_seconds: float


def read_exit(read_fd: int) -> ProgramExit | None:
    """The launcher's line from the read end of its pipe; ``None`` if it wrote none (killed).

    Call once the sandbox has exited and the caller's write end is closed.
    """
    chunks = []
    # The launcher may outlive bwrap by a moment (its parent-death signal is on its way).
    deadline = time.monotonic() + 5.0
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(read_fd, 256)
        if not chunk:
            break
        chunks.append(chunk)
    words = b"".join(chunks).decode("ascii", "replace").split()
    if len(words) != 4 or words[0] not in ("exit", "signal"):
        return None
    try:
        code, seconds, wall = int(words[1]), float(words[2]), float(words[3])
    except ValueError:
        return None
    return ProgramExit(code if words[0] == "exit" else -code, seconds, wall)


def build_launcher(compiler_command: Sequence[str]) -> str:
    """Compile the launcher into a new directory, removed when the process exits; its path.

    Raises:
        SandboxUnavailableError: the compiler could not be run or could not build it.
    """
    source = resources.files(__package__).joinpath("launcher.c").read_bytes()
    sweep_leftovers()
    directory = tempfile.mkdtemp(prefix=f"lossplug-launcher-{os.getpid()}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # The sandbox's unprivileged user must be able to run it.
    os.chmod(directory, 0o755)
    source_path = Path(directory, "launcher.c")
    source_path.write_bytes(source)
    binary = Path(directory, LAUNCHER)
    # "-x c++": the file is C that is also C++, and the compiler at hand is a C++ compiler.
    command = [*compiler_command, "-O2", "-o", str(binary), "-x", "c++", str(source_path)]
    try:
        # Static where the C library allows it: no loader run at each start, no library to show.
        built = subprocess.run([*command, "-static"], capture_output=True, timeout=120, check=False)
        if built.returncode != 0:
            built = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailableError(f"could not build the sandbox launcher: {exc}.") from exc
    if built.returncode != 0 or not binary.exists():
        message = built.stderr.decode(errors="replace").strip().splitlines()
        raise SandboxUnavailableError(
            "could not build the sandbox launcher with "
            f"{' '.join(compiler_command)}: {message[-1] if message else built.returncode}."
        )
    os.chmod(binary, 0o755)
    return directory


def sweep_leftovers() -> None:
    """Remove the private directories of this user's processes that died without cleaning up.

    A trainer the kernel killed (out of memory, SIGKILL) leaves its launcher and call
    directories in the temporary directory; their names carry the pid that made them.
    """
    for path in Path(tempfile.gettempdir()).glob("lossplug-*-*-*"):
        kind, _, rest = path.name[len("lossplug-") :].partition("-")
        pid_text = rest.partition("-")[0]
        if kind not in ("launcher", "speedup") or not pid_text.isdigit():
            continue
        with contextlib.suppress(OSError):
            if path.lstat().st_uid != os.geteuid() or not path.is_dir():
                continue
            try:
                os.kill(int(pid_text), 0)
                continue  # alive (or a pid reused since: left for a later sweep)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except PermissionError:
                continue
