"""The resource limits of every untrusted program, and how to apply them with or without a sandbox.

One list of limits, spelled as util-linux's ``prlimit`` spells them (``--as=SOFT:HARD``), serves
both paths: the sandbox's launcher applies them inside the sandbox, and without a sandbox
``prlimit`` (or, where it is missing, a ``preexec_fn``) applies them to the program itself.

Example:
    >>> limit_options([("as", 9, 1048576, 1048576), ("core", 4, 0, 0)])
    ['--as=1048576:1048576', '--core=0:0']
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence

try:
    import resource
except ImportError:  # Windows: no rlimits, no process groups
    resource = None  # type: ignore[assignment]

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_OPEN_FILES",
    "MAX_PROCESSES",
    "limit_options",
    "limit_values",
    "resource",
    "unsandboxed",
]

# Processes (threads included) a program or the compiler may have at once: a fork storm stops here.
MAX_PROCESSES = 64
# Files the programs may write (they should write none).
MAX_FILE_BYTES = 16 * 1024 * 1024
# Open files: each can hold a little kernel memory (a socket's buffers), so few.
MAX_OPEN_FILES = 256


def unsandboxed(timeout_s: float, memory_mb: int) -> tuple[list[str], Callable[[], None] | None]:
    """How to start a program under the limits without a sandbox: a prefix, or a ``preexec_fn``.

    The limits are applied by running the program through util-linux's ``prlimit``, which sets
    them on itself and then executes the program in the same process. A ``preexec_fn`` is the
    fallback where ``prlimit`` is missing (macOS, minimal images). ``prlimit`` is preferred
    because a ``preexec_fn`` makes ``subprocess`` fork the whole caller and run Python code in
    the child, instead of a cheap ``vfork``: the Python documentation warns that this can
    deadlock in a multi-threaded caller (a training loop with logger threads), and the CPU time
    the child spends before and during ``exec`` (copy-on-write faults, tearing down the copied
    address space) is charged to the measured program, a cost that grows with the caller's
    memory.
    """
    values = limit_values(timeout_s, memory_mb)
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        return [prlimit, *limit_options(values), "--"], None

    def apply_limits() -> None:
        for _, which, soft, hard in values:
            resource.setrlimit(which, (soft, hard))

    return [], apply_limits


def limit_values(timeout_s: float, memory_mb: int) -> list[tuple[str, int, int, int]]:
    """The limits of one run: ``(name for prlimit, resource, soft limit, hard limit)``."""
    assert resource is not None
    wanted = [
        ("as", resource.RLIMIT_AS, memory_mb * 1024 * 1024, memory_mb * 1024 * 1024),
        # A backstop to the wall-clock limit, for when the caller is itself stopped and cannot
        # kill the program: the soft limit sends SIGXCPU, the hard one, a second later, SIGKILL.
        ("cpu", resource.RLIMIT_CPU, math.ceil(timeout_s) + 1, math.ceil(timeout_s) + 2),
        ("fsize", resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
        ("core", resource.RLIMIT_CORE, 0, 0),
        ("nproc", resource.RLIMIT_NPROC, MAX_PROCESSES, MAX_PROCESSES),
        ("nofile", resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
        # POSIX message queues hold kernel memory that no other limit counts.
        ("msgqueue", resource.RLIMIT_MSGQUEUE, 0, 0),
    ]
    # Lowering a hard limit is always allowed, raising it is not: never ask for more than the
    # caller's own hard limit, or the program cannot start.
    values: list[tuple[str, int, int, int]] = []
    for name, which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        values.append((name, which, soft, hard))
    return values


def limit_options(values: Sequence[tuple[str, int, int, int]]) -> list[str]:
    """``values`` as prlimit's (and the launcher's) options: ``--NAME=SOFT:HARD`` each."""
    return [f"--{name}={soft}:{hard}" for name, _, soft, hard in values]
