r"""Comparing two programs' outputs, and quoting them, within bounded memory and text.

Outputs are compared as bytes, line by line after removing trailing whitespace from each line and
trailing empty lines, without ever splitting them into one object per line: an output of many
short lines would otherwise cost the caller a Python object per line, many times the output in
memory. :func:`normalise` makes one copy of the expected output; :func:`compare` reads the other
output window by window.

What reaches a logged string is an :func:`excerpt`: at most :data:`EXCERPT_CHARS` printable
characters, whatever the program printed (control characters, invalid UTF-8, a secret it read).

Example:
    >>> expected = normalise(b"1  \n2\n\n")
    >>> compare(expected, b"1\n2\n") is None
    True
    >>> compare(expected, b"1\n3\n")
    "wrong answer on line 2: expected '2', got '3'"
"""

from __future__ import annotations

import re

__all__ = ["EXCERPT_CHARS", "compare", "excerpt", "normalise", "shorten"]

# The most characters of a program's output that any message quotes.
EXCERPT_CHARS = 80
# Each side of a wrong answer gets half, so the message quotes at most EXCERPT_CHARS in all.
_QUOTE_CHARS = EXCERPT_CHARS // 2
_ERROR_CHARS = 200
# What str.rstrip() strips in ASCII: the whitespace that does not make a wrong answer.
_WHITESPACE = b" \t\r\x0b\x0c\x1c\x1d\x1e\x1f"
_TRAILING = re.compile(rb"[ \t\r\x0b\x0c\x1c-\x1f]+(?=\n|\Z)")
# A line with something on it after the first: the output has more than one line.
_MORE_LINES = re.compile(rb"\n[ \t\r\n\x0b\x0c\x1c-\x1f]*[^ \t\r\n\x0b\x0c\x1c-\x1f]")
# Windows of the compared output: bounded extra memory, few Python-level steps.
_WINDOW_BYTES = 1 << 20


def normalise(output: bytes | bytearray) -> bytes:
    """``output`` without trailing whitespace on any line and without trailing empty lines."""
    return _TRAILING.sub(b"", output).rstrip(_WHITESPACE + b"\n")


def compare(expected: bytes, actual: bytes | bytearray, where: str = "") -> str | None:
    """``None`` if ``actual`` normalises to ``expected``, else the first difference, quoted.

    Args:
        expected: A :func:`normalise` d output.
        actual: The raw output to check.
        where: Words naming the case (``" on input 2"``) for the message.
    """
    view = memoryview(expected)
    position = 0  # how much of the normalised ``actual`` matched ``expected`` so far
    start = 0
    window = b""
    while start < len(actual):
        end = actual.find(b"\n", min(start + _WINDOW_BYTES, len(actual)))
        end = len(actual) if end < 0 else end + 1
        window = _TRAILING.sub(b"", actual[start:end])
        start = end
        inside = min(len(window), len(expected) - position)
        if view[position : position + inside] != window[:inside]:
            offset = next(i for i in range(inside) if view[position + i] != window[i])
            return _difference(expected, position + offset, window, offset, actual, where)
        # Past the end of ``expected`` only trailing whitespace and empty lines may follow.
        if window[inside:].strip(_WHITESPACE + b"\n"):
            return _difference(expected, len(expected), window, inside, actual, where)
        position += inside
    if position < len(expected):
        return _difference(expected, position, window, len(window), actual, where)
    return None


def _difference(
    expected: bytes, at: int, window: bytes, offset: int, actual: bytes | bytearray, where: str
) -> str:
    """The message for a first difference at ``expected[at]`` / ``window[offset]``."""
    line_number = expected.count(b"\n", 0, at) + 1
    want = _line_at(expected, at)
    got = _line_at(window, offset)
    # One side ended its line where the other goes on to a next line: that next line differs.
    if at < len(expected) and offset >= len(window) and expected[at : at + 1] == b"\n":
        want, got = _line_at(expected, at + 1), None
        line_number += 1
    elif at >= len(expected) and window[offset : offset + 1] == b"\n":
        want, got = None, _line_at(window, offset + 1)
        line_number += 1
    several_lines = b"\n" in expected or _MORE_LINES.search(actual) is not None
    place = f"{where}, line {line_number}" if where else f" on line {line_number}"
    return (
        f"wrong answer{place if several_lines else where}: "
        f"expected {_quote(want)}, got {_quote(got)}"
    )


def _line_at(data: bytes, at: int) -> bytes | None:
    """The line of ``data`` holding byte ``at`` (or ending at the end); ``None`` past the end."""
    if at > len(data) or (at == len(data) and (at == 0 or data[at - 1 : at] == b"\n")):
        return None
    begin = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return data[begin : len(data) if end < 0 else end]


def _quote(line: bytes | None) -> str:
    if line is None:
        return "end of output"
    return repr(excerpt(line, _QUOTE_CHARS))


def excerpt(output: bytes | bytearray, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` printable characters of ``output``, ``...`` at the end if cut."""
    text = bytes(output[: limit * 4]).decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(message: str) -> str:
    """``message`` on one line, at most 200 characters."""
    message = " ".join(message.split())  # one line, whatever the program printed
    if len(message) > _ERROR_CHARS:
        message = message[: _ERROR_CHARS - 3] + "..."
    return message
