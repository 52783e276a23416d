"""Which isolation a caller asked for, and the error raised where the sandbox cannot be had.

Running untrusted code unsandboxed takes an explicit ``sandbox="none"`` (or
``LOSSPLUG_SANDBOX=none``), never a silent fallback: where no sandbox can be built,
:class:`SandboxUnavailableError` says what is missing and how to opt out.

Example:
    >>> resolve_sandbox("none")
    'none'
"""

from __future__ import annotations

import os

__all__ = ["SANDBOX_CHOICES", "SANDBOX_ENV", "SandboxUnavailableError", "resolve_sandbox"]

SANDBOX_ENV = "LOSSPLUG_SANDBOX"
SANDBOX_CHOICES = ("bwrap", "none")


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
