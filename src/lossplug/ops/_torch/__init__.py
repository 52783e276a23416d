"""Chunked PyTorch implementations of the fused ops (any device, bounded extra memory)."""
