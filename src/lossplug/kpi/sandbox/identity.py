"""Who a root caller's sandboxes run as: a user namespace, and one leased uid per call.

The kernel does not apply ``RLIMIT_NPROC`` to the host's uid 0, and counts it per uid: if every
sandbox ran as one uid, one program holding its process limit would starve the compiler of
every other call. So a root caller's sandboxes join a user namespace, made once per process,
that maps uid and gid 0 (for bwrap's own set-up) and a range of :data:`UID_COUNT` uids from
:data:`FIRST_UID` to themselves; each call leases one uid of the range through a lock file, so
that concurrent calls of every process on the machine get distinct ones.

Example:
    >>> import os
    >>> if os.geteuid() == 0:
    ...     with lease_uid() as uid:
    ...         assert FIRST_UID <= uid < FIRST_UID + UID_COUNT
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FIRST_UID", "UID_COUNT", "lease_uid", "root_user_namespace"]

# The host uids (and gids) root's sandboxes run as. Above the range systemd gives to containers
# (up to 1879048191), below 2**31 for tools that read a uid as a signed int.
FIRST_UID = 2_000_000_000
UID_COUNT = 65536
_PATH = "/usr/local/bin:/usr/bin:/bin"


@contextlib.contextmanager
def lease_uid() -> Iterator[int]:
    """A uid of the root range that no other live call on this machine holds.

    A lock file per uid in a root-only directory: the kernel drops a lock when its holder dies,
    so a crashed trainer leaves no uid taken.
    """
    directory = _lock_directory()
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    status = directory.lstat()
    if status.st_uid != 0 or not stat.S_ISDIR(status.st_mode):  # a link is not a directory
        raise OSError(f"{directory} is not a root-owned directory")
    # The lowest free uid: as few lock files as there are concurrent calls.
    for offset in range(UID_COUNT):
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(directory / str(offset), flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield FIRST_UID + offset
        finally:
            os.close(fd)
        return
    raise OSError(f"all {UID_COUNT} sandbox uids are in use")


def _lock_directory() -> Path:
    """Where the uid locks live: ``/run`` where root can write there, else the temp folder.

    Not under ``$TMPDIR``, so that root processes with different temp folders still lease
    distinct uids; and not in a world-writable folder where one can help it, where another user
    could create the directory first and refuse every lease.
    """
    base = "/run" if os.path.isdir("/run") and os.access("/run", os.W_OK) else None
    return Path(base or tempfile.gettempdir(), "lossplug-uids-0")


def root_user_namespace() -> int:
    """A user namespace mapping uid and gid 0 and the sandbox range to themselves; its descriptor.

    A short-lived ``unshare --user`` process creates it; root writes its maps from outside (which
    only a privileged parent may do) and keeps it alive by holding the descriptor.
    """
    unshare = shutil.which("unshare", path=_PATH)
    if unshare is None:
        raise OSError("util-linux's unshare is not installed")
    reader, writer = os.pipe()
    try:
        # The child blocks on the pipe until its maps are written, then exits.
        holder = subprocess.Popen(
            [unshare, "--user", "--", "/bin/sh", "-c", f"read line <&{reader}"],
            pass_fds=(reader,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            own = os.readlink("/proc/self/ns/user")
            deadline = time.monotonic() + 10.0
            while os.readlink(f"/proc/{holder.pid}/ns/user") == own:
                if holder.poll() is not None or time.monotonic() > deadline:
                    stderr = holder.stderr.read().decode(errors="replace").strip()
                    raise OSError(stderr or "unshare --user failed")
                time.sleep(0.001)
            mapping = f"0 0 1\n{FIRST_UID} {FIRST_UID} {UID_COUNT}\n"
            # setgroups stays allowed (root writes the maps, so the kernel does not require
            # "deny"): the launcher drops the caller's supplementary groups, root's among them.
            Path(f"/proc/{holder.pid}/uid_map").write_text(mapping)
            Path(f"/proc/{holder.pid}/gid_map").write_text(mapping)
            return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.write(writer, b"\n")
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(timeout=10)
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            if holder.stderr is not None:
                holder.stderr.close()
    finally:
        os.close(reader)
        os.close(writer)
