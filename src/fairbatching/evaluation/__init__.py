"""Evaluation at scale: workload families, cached parallel sweeps (local or Ray), capacity search, bounds."""

from fairbatching.evaluation.capacity import CapacityResult, find_capacity
from fairbatching.evaluation.families import FAMILIES, WorkloadFamily, family
from fairbatching.evaluation.runspec import ClusterRunSpec, RunSpec, run_spec
from fairbatching.evaluation.sweep import Sweeper

__all__ = [
    "FAMILIES",
    "CapacityResult",
    "ClusterRunSpec",
    "RunSpec",
    "Sweeper",
    "WorkloadFamily",
    "family",
    "find_capacity",
    "run_spec",
]
