"""Test-session setup that must happen before lossplug or triton is imported."""

import os

# The Triton kernels run on the CPU through the interpreter; it is chosen when a kernel is
# defined, so the variable must be set before any lossplug module that defines one is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
