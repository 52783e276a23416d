r"""Running one child process with a time limit: its output kept within bounds, its time measured.

:func:`run_process` starts a command in its own session with a wall-clock limit, feeds it its
input, and keeps what it prints within a fixed amount of the caller's memory whatever the
output's shape: standard output up to :data:`MAX_OUTPUT_BYTES` in one buffer, standard error only
its first and last :data:`STDERR_KEPT_BYTES` (enough to find the compiler's first error and the
last line of a traceback). Either stream running past :data:`MAX_OUTPUT_BYTES` stops the program.
The resource limits are the caller's to apply (:mod:`lossplug.kpi.sandbox.limits`).

Example:
    >>> run = run_process(["/bin/echo", "hi"], b"", 5.0, Path("/"), {"PATH": "/bin"}, None)
    >>> run.returncode, bytes(run.stdout)
    (0, b'hi\n')
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["MAX_OUTPUT_BYTES", "STDERR_KEPT_BYTES", "Run", "run_process"]

# Captured output is held in memory; a program printing in a tight loop until the time limit
# could otherwise fill the caller's memory, since a file-size limit does not apply to pipes.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
# Of standard error, the first and the last this many bytes are kept.
STDERR_KEPT_BYTES = 8192


@dataclass(frozen=True)
class Run:
    """One finished (or stopped) child process.

    ``stdout`` is everything it printed (at most :data:`MAX_OUTPUT_BYTES`); ``stderr`` its first
    and last :data:`STDERR_KEPT_BYTES`, joined by ``b"\n...\n"`` when the middle was dropped.
    """

    returncode: int
    stdout: bytes | bytearray
    stderr: bytes
    cpu_seconds: float
    timed_out: bool
    output_overflow: bool
    start_error: str | None = None
    wall_seconds: float = 0.0
    oom_killed: bool = False


def run_process(
    command: Sequence[str],
    stdin: bytes,
    timeout_s: float,
    cwd: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None,
    pass_fds: Sequence[int] = (),
    end_sandbox: Callable[[], None] | None = None,
) -> Run:
    """Run ``command`` in its own session under a wall-clock limit; return its output and time.

    ``subprocess.run`` does not fit: it kills only the direct child on a time-out (leaving
    anything it started running, and holding the pipes open), and it reaps the child with
    ``waitpid``, which discards the resource usage that ``os.wait4`` returns.

    ``end_sandbox``, for a sandboxed command, ends the sandbox from inside (its launcher kills
    everything and exits, so bwrap exits too and reaps it); the process group is killed only if
    that has not worked a second later, since a sandbox orphaned by its bwrap would be left for
    the host's init to reap.
    """
    started = time.monotonic()
    try:
        process = _start(command, cwd, env, preexec_fn, pass_fds)
    except (OSError, subprocess.SubprocessError) as exc:
        # Not executable, a limit too low for exec itself, ...
        return Run(-1, b"", b"", 0.0, timed_out=False, output_overflow=False, start_error=str(exc))
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

    stdout = _Capture(MAX_OUTPUT_BYTES, 0)
    stderr = _Capture(STDERR_KEPT_BYTES, STDERR_KEPT_BYTES)
    # Threads, not selectors: the main thread has to block in wait4 to get the resource usage.
    threads = [
        threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True),
        threading.Thread(
            target=_drain,
            args=(process.stdout, stdout, lambda: stop("overflow")),
            daemon=True,
        ),
        threading.Thread(
            target=_drain,
            args=(process.stderr, stderr, lambda: stop("overflow")),
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
        wall_seconds = time.monotonic() - started
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
    return Run(
        returncode=returncode,
        stdout=stdout.head,
        stderr=stderr.kept(),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out,
        output_overflow=overflow,
        wall_seconds=wall_seconds,
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


class _Capture:
    """What is kept of one output stream: its first ``head_bytes`` and its last ``tail_bytes``.

    Chunks go straight into one growing buffer, not a list joined at the end: a join would hold
    the output twice.
    """

    def __init__(self, head_bytes: int, tail_bytes: int) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_bytes - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk and self.tail_bytes:
            self.tail += chunk
            del self.tail[: max(0, len(self.tail) - self.tail_bytes)]

    def kept(self) -> bytes:
        if self.total > len(self.head) + len(self.tail):
            return bytes(self.head) + b"\n...\n" + bytes(self.tail)
        return bytes(self.head + self.tail)


def _drain(stream: IO[bytes], capture: _Capture, on_overflow: Callable[[], None]) -> None:
    """Read ``stream`` to its end into ``capture``; past the output cap, call ``on_overflow``."""
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
        if capture.total + len(chunk) > MAX_OUTPUT_BYTES:
            overflowed = True
            on_overflow()
            continue
        capture.add(chunk)
