"""Serving: the steppable ``Node`` every backend runs (simulator, GPU engine, Ray Serve replica, cluster) and
the single-node discrete-event ``Simulator`` that drives one with the cost model as its executor."""

from fairbatching.serving.node import IterationLog, Node, NodeConfig
from fairbatching.serving.simulator import NodeResult, Simulator, simulate

__all__ = ["IterationLog", "Node", "NodeConfig", "NodeResult", "Simulator", "simulate"]
