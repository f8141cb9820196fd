"""Evaluation at scale: cached parallel sweeps (local or Ray), capacity search, bounds, the evaluation tables."""

from fairbatching.evaluation.capacity import CapacityResult, find_capacity
from fairbatching.evaluation.sweep import Sweeper

__all__ = ["CapacityResult", "Sweeper", "find_capacity"]
