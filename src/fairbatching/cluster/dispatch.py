"""What a router process does, whatever runs the nodes: build a node's report from its step loop, and decide
where one request goes from the reports it has received. The cluster simulator and the live GPU cluster
(``engine.cluster``) both call these, so a routing rule behaves the same in simulation and on hardware.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from fairbatching.cluster.routers import NodeReport, Router
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.serving.node import Node
from fairbatching.workloads.spec import RequestSpec


def ended_request(spec: RequestSpec, default_slo: SLO, status: RequestStatus, reason: str) -> Request:
    """A request the router ended without sending it anywhere (refused, or lost), for the metrics."""
    r = Request(spec.request_id, spec.arrival, spec.prompt_len, spec.slo or default_slo)
    r.status, r.finish_reason = status, reason
    return r


def node_report(node: Node, index: Hashable, t: float, ttft_slo: float, with_budget: bool) -> NodeReport:
    """``node``'s report at ``t``: load, queued prompt tokens, KV in use and (when asked) its PAB."""
    queued = sum(r.num_tokens - r.num_computed for r in node.running + node.waiting if not r.is_decode)
    budget = None
    if with_budget:
        node.state.now = t
        budget = node.policy.admission_budget(node.state, ttft_slo)
    outstanding = len(node.running) + len(node.waiting)
    return NodeReport(index, t, outstanding, queued, node.kv.used_blocks * node.kv.block_size, budget)


@dataclass(frozen=True, slots=True)
class Routed:
    """One routing decision: ``node`` set (send it there), ``retry_at`` set (hold it and decide again
    then), or ``refusal`` set (end it rejected, with this reason)."""

    node: Hashable | None = None
    retry_at: float | None = None
    refusal: str | None = None


def route(
    router: Router,
    views: list[NodeReport],
    prompt_tokens: int,
    arrival: float,
    ttft: float,
    now: float,
    admission: str,
    interval: float,
    blocks: Sequence[int] = (),
) -> Routed:
    """Where a request (``ttft``: its first-token SLO) goes, given the reports as read at ``now``. With no
    node reachable it waits for a report while its first token is not yet due; with ``admission="defer"``
    and no budget that fits it is held while one more report interval still leaves its first-token
    deadline ahead; otherwise a request the router refuses is rejected with the reason. ``blocks``: the
    prompt's block hashes, for the routers that weigh where a prefix is cached."""
    first_token_due = arrival + ttft
    idx = router.choose(prompt_tokens, views, ttft, blocks)
    if idx is not None:
        router.note_dispatch(idx, prompt_tokens, blocks)
        return Routed(node=views[idx].node)
    if not views:
        if now < first_token_due:
            return Routed(retry_at=now + interval)
        return Routed(refusal="no node reachable")
    if admission == "defer" and now + interval < first_token_due:
        return Routed(retry_at=now + interval)
    return Routed(refusal=f"admission control: no node's prefill budget fits {prompt_tokens} tokens")
