"""Cluster level: nodes behind a router that sees only the signals nodes report (PAB, load), with delay."""

from fairbatching.cluster.routers import ROUTERS, NodeReport, ReportAging, Router, make_router
from fairbatching.cluster.simulator import ClusterConfig, ClusterResult, NodeSpec, simulate_cluster

__all__ = [
    "ROUTERS",
    "ClusterConfig",
    "ClusterResult",
    "NodeReport",
    "NodeSpec",
    "ReportAging",
    "Router",
    "make_router",
    "simulate_cluster",
]
