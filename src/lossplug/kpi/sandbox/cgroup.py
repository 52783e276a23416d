"""A memory cgroup of its own for a sandbox, where the machine lets this process make one.

Rlimits bound a process's address space, not the memory it can make the kernel hold for it
(tmpfs and shared-memory pages, pipe and socket buffers, page tables). A memory cgroup counts all
of them, and when one is full the kernel's OOM killer picks inside it, never the trainer. One is
made below this process's own cgroup when that is allowed: cgroup v2 whose memory controller is
already enabled for children (a delegated subtree, a root container), or cgroup v1's memory
hierarchy where the caller may create groups (root). Otherwise the sandbox bounds memory by its
other means (sized mounts, no shared memory, ``oom_score_adj``) and says so.

The launcher joins the group before it starts the program, through a descriptor of the group's
``cgroup.procs`` that the caller opened (the sandbox has no ``/sys``), so everything the program
starts is in it.

Example:
    >>> parent = find_parent()
    >>> parent is None or parent.version in (1, 2)
    True
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupParent", "MemoryCgroup", "find_parent", "memory_cgroup"]

_ROOT = Path("/sys/fs/cgroup")
_COUNTER = itertools.count()
# Kernel memory of the sandbox itself (page tables, the launcher, socket buffers) beyond the
# program's address space and its scratch directory.
_SLACK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class CgroupParent:
    """Where this process may create memory cgroups: a directory and its cgroup version."""

    path: Path
    version: int


@dataclass(frozen=True)
class MemoryCgroup:
    """One sandbox's memory cgroup: where it is, and a descriptor of its ``cgroup.procs``."""

    path: Path
    procs_fd: int

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer ended a process of this group."""
        for name in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError, ValueError):
                for line in (self.path / name).read_text().splitlines():
                    words = line.split()
                    if len(words) == 2 and words[0] == "oom_kill":
                        return int(words[1]) > 0
        return False


def find_parent() -> CgroupParent | None:
    """The cgroup below which sandboxes get their own memory group, checked by making one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[CgroupParent] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            for mount in (_ROOT, _ROOT / "unified"):
                base = mount / relative
                enabled = base / "cgroup.subtree_control"
                with contextlib.suppress(OSError):
                    if "memory" in enabled.read_text().split():
                        candidates.append(CgroupParent(base, 2))
        elif "memory" in controllers.split(","):
            candidates.append(CgroupParent(_ROOT / "memory" / relative, 1))
    for candidate in candidates:
        try:
            with memory_cgroup(candidate, 64 * 1024 * 1024):
                pass
        except OSError:
            continue
        _sweep(candidate)
        return candidate
    return None


def _sweep(parent: CgroupParent) -> None:
    """Remove the empty groups of processes that died without removing them (killed)."""
    for group in parent.path.glob("lossplug-*-*"):
        pid = group.name.split("-")[1]
        if pid.isdigit() and not Path("/proc", pid).exists():
            with contextlib.suppress(OSError):
                group.rmdir()


@contextlib.contextmanager
def memory_cgroup(parent: CgroupParent, limit_bytes: int) -> Iterator[MemoryCgroup]:
    """A new memory cgroup of ``limit_bytes`` (plus slack) for one sandbox, for the block.

    Yields:
        The group, with a write-only descriptor of its ``cgroup.procs`` for the launcher.

    Raises:
        OSError: the group cannot be made or limited.
    """
    group = parent.path / f"lossplug-{os.getpid()}-{next(_COUNTER)}"
    group.mkdir()
    try:
        limit = str(limit_bytes + _SLACK_BYTES)
        if parent.version == 2:
            (group / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):
                (group / "memory.memsw.limit_in_bytes").write_text(limit)
        fd = os.open(group / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            yield MemoryCgroup(group, fd)
        finally:
            os.close(fd)
    finally:
        _remove(group)


def _remove(group: Path) -> None:
    # The launcher has reaped everything before it exits, but the kernel may take a moment to
    # see the group empty.
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
