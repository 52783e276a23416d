"""Fused ops over the logits: loss, gradient and token statistics in one pass."""

from lossplug.ops.cross_entropy import cross_entropy
from lossplug.ops.linear_cross_entropy import linear_cross_entropy
from lossplug.ops.stats import TokenStats

__all__ = ["TokenStats", "cross_entropy", "linear_cross_entropy"]
