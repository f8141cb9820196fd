"""Iteration-level discrete-event simulation: one steppable ``Node``, and a single-node ``Simulator``."""

from fairbatching.sim.node import IterationLog, Node, SimConfig
from fairbatching.sim.simulator import SimResult, Simulator, simulate

__all__ = ["IterationLog", "Node", "SimConfig", "SimResult", "Simulator", "simulate"]
