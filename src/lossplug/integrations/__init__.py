"""Adapters that route other libraries' models through lossplug's fused ops.

``lossplug.integrations.transformers`` patches Hugging Face causal LMs; it is loaded on first use
and imports nothing from ``transformers`` itself (it works on the model object it is given).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["transformers"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
