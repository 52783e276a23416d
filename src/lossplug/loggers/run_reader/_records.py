"""The records of a ``.wandb`` file: its chunk framing undone, each record decoded.

File layout (the LevelDB log format with its own header)::

    header   7 bytes   b":W&B", magic 0xBEE1 (uint16 little-endian), version byte (0)
    blocks   32 KiB each, counted from the start of the file (the header sits in block 0)
    chunk    CRC-32 (uint32 LE) | length (uint16 LE) | type (1 byte) | data
             type FULL=1 holds a whole record; FIRST=2, MIDDLE=3, LAST=4 hold the pieces of a
             record that crosses block boundaries; a block tail shorter than 7 bytes is zero
             padding. The CRC is plain CRC-32 (zlib.crc32, IEEE polynomial, unmasked) over the
             type byte followed by the data.
    record   the reassembled data of one record: a ``wandb_internal_pb2.Record`` protobuf
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lossplug.loggers.run_reader._problems import DAMAGED, ReadProblem

__all__ = ["HEADER", "iter_payloads", "iter_records"]

_MAGIC = b":W&B"
_MAGIC_NUMBER = 0xBEE1
_VERSION = 0
HEADER = _MAGIC + struct.pack("<HB", _MAGIC_NUMBER, _VERSION)
_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | os.PathLike[str], errors: list[str] | None = None) -> Iterator[Any]:
    """Yield each ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in file order.

    Reading stops quietly at the end of what was written; problems (truncation, CRC mismatch,
    undecodable record) are appended to ``errors`` as
    :class:`~lossplug.loggers.ReadProblem` of kind ``DAMAGED`` instead of raised, and reading
    resumes at the next block after a corrupt chunk, like LevelDB's log reader.

    Args:
        path: A ``.wandb`` file.
        errors: A list that receives one message per problem; ``None`` to drop them.

    Raises:
        ValueError: The file does not start with a W&B header of a supported version.

    Example:
        Count the records by type::

            from collections import Counter
            Counter(r.WhichOneof("record_type") for r in iter_records("run-abc123.wandb"))
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    errors = [] if errors is None else errors
    for offset, payload in iter_payloads(Path(path), errors):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            errors.append(
                ReadProblem(f"record at byte {offset}: not a valid W&B record ({exc})", DAMAGED)
            )
            continue
        yield record


def iter_payloads(path: Path, errors: list[str]) -> Iterator[tuple[int, bytes]]:
    """Reassemble the chunked payloads; yields ``(offset of the first chunk, payload)``."""
    data = path.read_bytes()
    _check_header(path, data)
    size = len(data)
    pos = len(HEADER)
    pending: bytearray | None = None
    pending_at = 0
    # After a corrupt chunk, pieces of a record whose start was lost must be dropped.
    resyncing = False

    def damaged(detail: str) -> None:
        errors.append(ReadProblem.about(path.name, DAMAGED, detail))

    def corrupt(message: str) -> int:
        nonlocal pending, resyncing
        damaged(f"{message}; skipped to the next block")
        pending, resyncing = None, True
        return (pos // _BLOCK + 1) * _BLOCK

    while pos < size:
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:
            pos += room  # zero padding at the end of a block
            continue
        if pos + _CHUNK_HEADER.size > size:
            damaged(f"file ends inside a chunk header at byte {pos} (truncated)")
            pending = None
            break
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if crc == 0 and length == 0 and kind == 0:
            # A zero-filled region: space reserved but never written (e.g. after a crash).
            pos = corrupt(f"zero-filled chunk header at byte {pos}")
            continue
        if length > room - _CHUNK_HEADER.size:
            pos = corrupt(f"chunk at byte {pos} claims {length} bytes, more than its block holds")
            continue
        if end > size:
            damaged(
                f"file ends inside a chunk at byte {pos} "
                f"({length} bytes announced, {size - start} present; truncated)"
            )
            pending = None
            break
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes((kind,)))) != crc:
            pos = corrupt(f"CRC mismatch in the chunk at byte {pos}")
            continue
        chunk_at, pos = pos, end
        if kind == _FULL:
            if pending is not None:
                damaged(f"record started at byte {pending_at} has no end")
            pending, resyncing = None, False
            yield chunk_at, chunk
        elif kind == _FIRST:
            if pending is not None:
                damaged(f"record started at byte {pending_at} has no end")
            pending, pending_at, resyncing = bytearray(chunk), chunk_at, False
        elif kind in (_MIDDLE, _LAST):
            if pending is None:
                if not resyncing:
                    damaged(f"record piece at byte {chunk_at} has no start")
                continue
            pending += chunk
            if kind == _LAST:
                yield pending_at, bytes(pending)
                pending = None
        else:
            pos = corrupt(f"unknown chunk type {kind} at byte {chunk_at}")
    if pending is not None:
        damaged(f"file ends inside the record started at byte {pending_at} (truncated)")


def _check_header(path: Path, data: bytes) -> None:
    if len(data) < len(HEADER) or data[: len(_MAGIC)] != _MAGIC:
        raise ValueError(
            f"{path} is not a W&B run file: it does not start with the {_MAGIC!r} header"
            + (" (the file is empty)" if not data else "")
        )
    magic, version = struct.unpack_from("<HB", data, len(_MAGIC))
    if magic != _MAGIC_NUMBER:
        raise ValueError(
            f"{path} is not a W&B run file: magic number {magic:#06x}, "
            f"expected {_MAGIC_NUMBER:#06x}"
        )
    if version != _VERSION:
        raise ValueError(
            f"{path}: W&B run file format version {version} is not supported (only {_VERSION})"
        )
