"""Iteration-level discrete-event simulation of one serving node."""

from fairbatching.sim.simulator import SimConfig, SimResult, Simulator, simulate

__all__ = ["SimConfig", "SimResult", "Simulator", "simulate"]
