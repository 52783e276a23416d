"""What both examples learn from and are scored on: Python source from the standard library of
the interpreter that runs them (held-out files for validation, their docstrings as prose), the
windows a model trains on, and the code KPI's prompts and scorer."""

from __future__ import annotations

import ast
import io
import sysconfig
import tokenize
from pathlib import Path

import torch
from torch.utils.data import Dataset

PROMPTS = [
    "def ",
    "import ",
    "class ",
    "    return ",
    "for i in ",
    "if ",
    "    def __init__(",
    "# ",
]


def stdlib_sources(max_bytes: int) -> tuple[str, str, str]:
    """Python source from the standard library: training text, held-out validation text and the
    docstrings of the held-out files (prose)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, val, size = [], [], 0
    for index, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        (val if index % 10 == 0 else train).append(text)  # whole files held out
        size += len(text)
        if size >= max_bytes:
            break
    if not train or not val:
        raise SystemExit(f"found too little Python source under {root}")
    return "\n".join(train), "\n".join(val), "\n\n".join(map(docstrings, val))


def byte_ids(text: str) -> torch.Tensor:
    """The tokens of a byte-level model: the UTF-8 bytes of ``text``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def docstrings(source: str) -> str:
    """The docstrings of a module's source, its classes and functions: English prose."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(doc for doc in found if doc)


class Windows(Dataset):
    """Fixed-length windows at reproducible random offsets of a token sequence."""

    def __init__(self, ids: torch.Tensor, length: int, count: int, seed: int) -> None:
        if len(ids) <= length:
            raise SystemExit(f"the corpus ({len(ids)} tokens) is shorter than --seq-len {length}")
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(ids) - length, (count,), generator=gen)
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.offsets[index])
        return self.ids[start : start + self.length]


class Sliced(Dataset):
    """Several datasets one after the other, each item a dict ``{"ids", "kind"}`` that names the
    slice it comes from, for ``LossMonitor(slice_by="kind")``."""

    def __init__(self, **parts: Dataset) -> None:
        self.items = [(kind, i) for kind, part in parts.items() for i in range(len(part))]
        self.parts = parts

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        kind, i = self.items[index]
        return {"ids": self.parts[kind][i], "kind": kind}


def python_tokenizes(prompt: str, completion: str) -> float:
    """1.0 when Python's tokenizer accepts the prompt and the completion's whole lines."""
    text = prompt + completion
    if "\n" in completion:
        text = text[: text.rfind("\n") + 1]
    if "\ufffd" in text:  # bytes that are not even UTF-8
        return 0.0
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ERRORTOKEN:
                return 0.0
    except (tokenize.TokenError, SyntaxError):
        return 0.0
    return 1.0
