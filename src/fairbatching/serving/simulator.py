"""Single-node discrete-event simulation: a workload replayed through one ``Node``."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fairbatching.core.request import Request
from fairbatching.costmodel.model import BatchPricer
from fairbatching.policies.base import Policy
from fairbatching.serving.node import IterationLog, Node, NodeConfig, ProgressFn
from fairbatching.workloads.spec import Workload

__all__ = ["IterationLog", "NodeConfig", "NodeResult", "Simulator", "node_result", "paused_gc", "simulate"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a simulation run, as it was before afterwards.

    A step allocates hundreds of short-lived objects (token times, plan items) that reference counting
    frees; each allocation burst triggers the cyclic collector, whose older-generation passes walk every
    live request and its token times, a set that grows all run long: at the knee that was a fifth of the
    run's time. The run creates no reference cycles per step, so nothing accumulates while it is off.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class NodeResult:
    policy: str
    requests: list[Request]
    output_lens: dict[str, int]
    end_time: float
    busy_time: float
    iterations: int
    preemptions: int
    log: IterationLog
    kv_blocks: int
    # Real backends only: one profile row per executed step (new, context, seqs, attn work, seconds).
    step_rows: list[tuple[int, int, int, float, float]] | None = None
    # Beside each row: start, how it ran (graph kind or eager), prefill chunks, largest chunk, deepest prefix.
    step_detail: list[tuple[float, str, int, int, int]] | None = None


def node_result(node: Node, step_rows: list | None = None, step_detail: list | None = None) -> NodeResult:
    """Everything a finished node has to report, for the metrics module (simulated or real backend)."""
    return NodeResult(
        node.policy.name,
        node.done,
        node.targets,
        node.clock,
        node.busy,
        node.iterations,
        node.preemptions,
        node.log,
        node.config.kv.num_blocks,
        step_rows=step_rows,
        step_detail=step_detail,
    )


class Simulator:
    def __init__(self, policy: Policy, cost_model: BatchPricer, config: NodeConfig) -> None:
        self.policy = policy
        self.cost = cost_model
        self.config = config

    def run(self, workload: Workload, progress: ProgressFn | None = None) -> NodeResult:
        node = Node(self.policy, self.cost, self.config)
        specs = sorted(workload.requests, key=lambda s: s.arrival)
        total = len(specs)
        if specs:
            node.clock = specs[0].arrival
        if progress is not None:
            node.on_finish = lambda _r: progress(len(node.done), total)
        with paused_gc():
            for s in specs:
                node.advance_to(s.arrival)
                node.submit(node.new_request(s.request_id, s.arrival, s.prompt_len, s.slo), s.output_len)
            node.drain()
        if progress is not None:
            progress(len(node.done), total)
        return node_result(node)


def simulate(
    policy: Policy, cost_model: BatchPricer, workload: Workload, config: NodeConfig, progress: ProgressFn | None = None
) -> NodeResult:
    return Simulator(policy, cost_model, config).run(workload, progress)
