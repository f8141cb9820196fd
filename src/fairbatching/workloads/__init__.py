"""Workloads: what arrives when, how long its prompt is, and (hidden from policies) how much it generates."""

from fairbatching.workloads.spec import RequestSpec, Workload
from fairbatching.workloads.synthetic import LengthDist, default_workload, synthetic_workload
from fairbatching.workloads.traces import TRACE_FORMATS, load_trace

__all__ = [
    "TRACE_FORMATS",
    "LengthDist",
    "RequestSpec",
    "Workload",
    "default_workload",
    "load_trace",
    "synthetic_workload",
]
