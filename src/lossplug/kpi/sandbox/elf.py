"""The shared libraries an ELF executable needs, so that its sandbox can show those and no more.

The compiled program runs where it sees only itself and the files the dynamic loader opens for it:
its interpreter (``PT_INTERP``, the loader) and, transitively, each ``DT_NEEDED`` library. The
headers are read here, as data: running ``ldd`` on a program a model wrote would execute it on
the host. Names are resolved the way the loader resolves them on the systems lossplug runs on:
through ``ldconfig -p`` (the loader's cache), else in the usual library directories. A library
the loader would find only through ``LD_LIBRARY_PATH`` or an ``RPATH`` is not found, nor an
interpreter that is not the system's loader, and the program then fails to start, which the
caller reports like any other failure.

Example:
    >>> import sys
    >>> libraries = needed_files("/bin/sh") if sys.platform.startswith("linux") else []
    >>> all(path.startswith("/") for path in libraries)
    True
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess

__all__ = ["needed_files"]

_PT_INTERP = 3
_PT_DYNAMIC = 2
_PT_LOAD = 1
_DT_NEEDED = 1
_DT_STRTAB = 5
# Where the loader looks when its cache does not name a library (glibc's trusted directories).
_LIBRARY_DIRS = (
    "/lib64",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib",
    "/usr/lib",
)
# More is not a real program: a guard against a crafted file.
_MAX_LIBRARIES = 256


def needed_files(executable: str) -> list[str]:
    """The loader and every shared library ``executable`` needs, as the loader opens them.

    Args:
        executable: Path of an ELF executable.

    Returns:
        Absolute paths, the interpreter first; empty for a static executable or a file that is
        not a readable ELF file.
    """
    header = _read_header(executable)
    if header is None:
        return []
    interpreter, names = header
    found: list[str] = [interpreter] if _is_loader(interpreter) else []
    machine = _machine(executable)
    pending = list(names)
    seen: set[str] = set()
    while pending and len(seen) < _MAX_LIBRARIES:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        path = _resolve(name, machine)
        if path is None or path in found:
            continue
        found.append(path)
        library = _library_header(path)
        if library is not None:
            pending.extend(library[1])
    return found


def _is_loader(path: str) -> bool:
    """``path`` is the system's dynamic loader, not any file a crafted header names.

    The interpreter of an executable is shown in its sandbox: a header naming a private file,
    or a static program that would run in the loader's place, must not get it shown.
    """
    real = os.path.realpath(path)
    return (
        os.path.basename(real).startswith("ld-")
        and ".so" in os.path.basename(real)
        and os.path.dirname(real) in {os.path.realpath(d) for d in _LIBRARY_DIRS}
        and os.path.isfile(real)
    )


def _machine(path: str) -> tuple[int, int] | None:
    """(ELF class, machine) of ``path``, or ``None`` when it is not an ELF file."""
    try:
        with open(path, "rb") as file:
            ident = file.read(20)
    except OSError:
        return None
    if len(ident) < 20 or ident[:4] != b"\x7fELF":
        return None
    order = "<" if ident[5] == 1 else ">"
    return ident[4], struct.unpack_from(order + "H", ident, 18)[0]


@functools.cache
def _library_header(path: str) -> tuple[str, list[str]] | None:
    # System libraries do not change under a running trainer; each is read once per process.
    return _read_header(path)


def _read_header(path: str) -> tuple[str, list[str]] | None:
    """(interpreter or "", DT_NEEDED names) of an ELF file, or ``None`` if it cannot be read."""
    try:
        with open(path, "rb") as file:
            data = file.read(16 * 1024 * 1024)
        return _parse(data)
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _parse(data: bytes) -> tuple[str, list[str]]:
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    wide = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    if wide:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "Q", data, 32)[0],
            *struct.unpack_from(order + "HH", data, 54),
        )
        program_header = order + "IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, ...
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "I", data, 28)[0],
            *struct.unpack_from(order + "HH", data, 42),
        )
        program_header = order + "IIIIIIII"  # type, offset, vaddr, paddr, filesz, ...
    interpreter = ""
    dynamic: tuple[int, int] | None = None
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    for index in range(min(phnum, 512)):
        fields = struct.unpack_from(program_header, data, phoff + index * phentsize)
        if wide:
            kind, offset, vaddr, filesz = fields[0], fields[2], fields[3], fields[5]
        else:
            kind, offset, vaddr, filesz = fields[0], fields[1], fields[2], fields[4]
        if kind == _PT_INTERP:
            interpreter = data[offset : offset + filesz].split(b"\0", 1)[0].decode()
        elif kind == _PT_DYNAMIC:
            dynamic = (offset, filesz)
        elif kind == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
    if dynamic is None:
        return interpreter, []
    entry = order + ("qQ" if wide else "iI")
    size = struct.calcsize(entry)
    needed: list[int] = []
    strtab = None
    for position in range(dynamic[0], dynamic[0] + dynamic[1] - size + 1, size):
        tag, value = struct.unpack_from(entry, data, position)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
    if strtab is None:
        return interpreter, []
    # DT_STRTAB is an address: the file offset is where a PT_LOAD segment maps it.
    base = next((o + strtab - v for v, o, n in loads if v <= strtab < v + n), None)
    if base is None:
        raise ValueError("string table outside every segment")
    names = [data[base + i : data.index(b"\0", base + i)].decode() for i in needed]
    # A name with a slash is a path; the loader's search applies only to bare names.
    return interpreter, [name for name in names if name and "/" not in name]


def _resolve(name: str, machine: tuple[int, int] | None) -> str | None:
    for path in (*_cache().get(name, ()), *(os.path.join(d, name) for d in _LIBRARY_DIRS)):
        if os.path.isfile(path) and (machine is None or _machine(path) == machine):
            return path
    return None


@functools.cache
def _cache() -> dict[str, tuple[str, ...]]:
    """The loader's cache, from ``ldconfig -p``: library name → paths, in the cache's order."""
    ldconfig = shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")
    if ldconfig is None:
        return {}
    try:
        listing = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, arrow, path = line.strip().partition(" => ")
        if arrow:
            cache.setdefault(name.split(" (", 1)[0], []).append(path.strip())
    return {name: tuple(paths) for name, paths in cache.items()}
