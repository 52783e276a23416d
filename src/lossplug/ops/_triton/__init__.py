"""Triton kernels (imported lazily: ``TRITON_INTERPRET`` is read when the kernels are defined)."""
