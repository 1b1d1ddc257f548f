"""Naive fine-tuning: cross-entropy on the new task only (the lower bound; forgets)."""

from __future__ import annotations

from training.registry import register
from training.strategies.base import Strategy


@register("naive")
class Naive(Strategy):
    """No buffer, no penalty: the base loop as is."""
