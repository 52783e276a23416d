"""What could not be read from a run: one :class:`ReadProblem` each, in ``RunData.errors``."""

from __future__ import annotations

__all__ = ["DAMAGED", "NOT_READ", "NO_EXIT", "ReadProblem"]

# ReadProblem.kind: what went wrong, so that callers need not match message text.
NO_EXIT = "no_exit"  # no exit record: the run is still running or was killed, or the file is cut
DAMAGED = "damaged"  # part of the file is lost: truncated, a corrupt chunk, an undecodable record
NOT_READ = "not_read"  # the file could not be read at all (an OS error, or a part without header)
_KINDS = (NO_EXIT, DAMAGED, NOT_READ)


class ReadProblem(str):
    """One message about what could not be read, tagged with its kind and the file it names.

    A ``str`` subclass: its text, equality and hash are the message's, so it prints, compares,
    joins and serialises as the plain message does.

    Attributes:
        kind: :data:`NO_EXIT`, :data:`DAMAGED` or :data:`NOT_READ`.
        file: The file the message begins with (``"<file>: ..."``), as written there: a
            ``.wandb`` file name, ``"<run folder>/<file name>"`` for a part of a resumed run,
            or a path; ``None`` when the message names no file.

    Example:
        >>> problem = ReadProblem("run-x.wandb: CRC mismatch in the chunk at byte 7", DAMAGED,
        ...                       file="run-x.wandb")
        >>> problem == "run-x.wandb: CRC mismatch in the chunk at byte 7", problem.kind
        (True, 'damaged')
        >>> problem.detail
        'CRC mismatch in the chunk at byte 7'
    """

    __slots__ = ("file", "kind")

    kind: str
    file: str | None

    def __new__(cls, text: str, kind: str, file: str | None = None) -> ReadProblem:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        if file is not None and not text.startswith(f"{file}: "):
            raise ValueError(f"the message does not begin with {file!r}: {text!r}")
        problem = super().__new__(cls, text)
        problem.kind = kind
        problem.file = file
        return problem

    def __getnewargs__(self) -> tuple[str, str, str | None]:  # type: ignore[override]
        # pickle and copy rebuild through __new__, which needs the kind and file too.
        return str(self), self.kind, self.file

    @classmethod
    def about(cls, file: str, kind: str, detail: str) -> ReadProblem:
        """The problem ``detail`` in ``file``, written ``"<file>: <detail>"``."""
        return cls(f"{file}: {detail}", kind, file=file)

    @property
    def detail(self) -> str:
        """The message without its leading ``"<file>: "``."""
        text = str(self)
        return text if self.file is None else text[len(self.file) + 2 :]
