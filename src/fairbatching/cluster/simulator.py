"""Cluster simulation: N nodes (each a ``Node`` driving its own policy object) behind a router.

Time advances event by event: node failures, report ticks (every node publishes a ``NodeReport``; the
router receives it ``report_delay`` later), and arrivals (the router picks a node from what it has
received). Between events every live node runs its own iterations. Nothing is lost: a request ends
finished, rejected (no node, or admission control), timed out, or failed (its node died), each with a
reason; with ``on_failure="retry"`` requests that had not produced a token are routed again.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from fairbatching.cluster.dispatch import ended_request, node_report, route
from fairbatching.cluster.routers import NodeReport, ReportAging, Router, make_router
from fairbatching.core.modes import Admission, OnFailure, parse_mode
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.policies import make_policy
from fairbatching.serving.node import Node, NodeConfig
from fairbatching.serving.simulator import paused_gc
from fairbatching.workloads.spec import RequestSpec, Workload


@dataclass(frozen=True)
class NodeSpec:
    policy: str = "fairbatching"
    profile: str | None = None


@dataclass(frozen=True)
class ClusterConfig:
    nodes: tuple[NodeSpec, ...]
    slo: SLO
    router: str = "pab"
    # What to do when no node's PAB fits a request. Nodes apply the same rule to what they are sent, on their own
    # current budget, and refuse a request whose first-token deadline passes before its first token: without
    # that, a request the router let through on a stale report waits behind every feasible one (the tail).
    admission: Admission = Admission.NONE
    report_interval: float = 0.5
    report_delay: float = 0.0
    stale_after: float | None = None  # default: two intervals plus the delay
    failures: tuple[tuple[int, float], ...] = ()  # (node index, time it stops answering)
    on_failure: OnFailure = OnFailure.FAIL
    seed: int = 0
    # Nodes cache prefixes (``NodeConfig.prefix_caching``), and routers are shown each prompt's block hashes.
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a cluster needs at least one node")
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission, "admission"))
        object.__setattr__(self, "on_failure", parse_mode(OnFailure, self.on_failure, "on_failure"))
        self.make_router()  # an unknown router, or admission without the pab router, fails here
        if self.report_interval <= 0 or self.report_delay < 0:
            raise ConfigError("report_interval must be positive and report_delay non-negative")
        for node, _ in self.failures:
            if not 0 <= node < len(self.nodes):
                raise ConfigError(f"failure names node {node}, the cluster has nodes 0..{len(self.nodes) - 1}")

    def make_router(self) -> Router:
        """A fresh router for one run of this cluster (a prefix index holds as many blocks as a node's cache)."""
        kv = load_profile(self.nodes[0].profile).kv
        return make_router(
            self.router,
            admission=self.admission != "none",
            seed=self.seed,
            kv_blocks=kv.num_blocks,
            block_size=kv.block_size,
        )

    @property
    def aging(self) -> ReportAging:
        return ReportAging(self.report_interval, self.report_delay, self.stale_after)

    @property
    def staleness(self) -> float:
        return self.aging.staleness


@dataclass
class ClusterResult:
    requests: list[Request]
    end_time: float
    busy_time: float  # summed over nodes
    preemptions: int
    per_node: list[dict] = field(default_factory=list)


_FAIL, _TICK, _ARRIVE, _RETRY = 0, 1, 2, 3


def simulate_cluster(
    workload: Workload, config: ClusterConfig, progress: Callable[[int, int], None] | None = None
) -> ClusterResult:
    with paused_gc():
        return _Cluster(config).run(workload, progress)


class _Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.cfg = config
        self.nodes: list[Node] = []
        for i, spec in enumerate(config.nodes):
            prof = load_profile(spec.profile)
            cost = prof.cost_model()
            policy = make_policy(spec.policy, cost, tpot_slo=config.slo.tpot)
            node_config = NodeConfig(
                config.slo,
                prof.kv,
                record_iterations=False,
                admission=config.admission,
                prefix_caching=config.prefix_caching,
            )
            self.nodes.append(Node(policy, cost, node_config, f"n{i}"))
        self.alive = [True] * len(self.nodes)
        self.router = config.make_router()
        self.reports: list[list[NodeReport]] = [[] for _ in self.nodes]
        self.ended: list[Request] = []
        self.events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self.sent: dict[str, RequestSpec] = {}  # what each node was sent, for a retry after a failure

    def push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, self._seq, payload))

    def run(self, workload: Workload, progress: Callable[[int, int], None] | None) -> ClusterResult:
        specs = sorted(workload.requests, key=lambda s: s.arrival)
        if not specs:
            return ClusterResult([], 0.0, 0.0, 0)
        t0 = specs[0].arrival
        for n in self.nodes:
            n.clock = t0
        for s in specs:
            self.push(s.arrival, _ARRIVE, s)
        for node, t in self.cfg.failures:
            self.push(t, _FAIL, node)
        self.publish(t0)
        self.push(t0 + self.cfg.report_interval, _TICK, None)
        arrivals_left = len(specs)
        total = len(specs)
        while self.events:
            t, kind, _, payload = heapq.heappop(self.events)
            if kind == _TICK and arrivals_left == 0 and not any(k in (_RETRY, _FAIL) for _, k, _, _ in self.events):
                continue  # nothing left to route: stop ticking and let the nodes drain
            if kind in (_FAIL, _TICK):
                # Reports need every node's state at t; arrivals only touch the node they are sent to
                # (dispatch advances it), since the router decides from reports, not live state.
                for i, n in enumerate(self.nodes):
                    if self.alive[i]:
                        n.advance_to(t)
            if kind == _FAIL:
                self.fail(payload, t)
            elif kind == _TICK:
                self.publish(t)
                self.push(t + self.cfg.report_interval, _TICK, None)
            elif kind == _ARRIVE:
                arrivals_left -= 1
                self.dispatch(payload, t, None)
                if progress is not None and arrivals_left % 500 == 0:
                    progress(total - arrivals_left, total)
            else:
                self.dispatch(payload[0], t, payload[1])
        requests = self.drain(specs)
        if progress is not None:
            progress(total, total)
        return ClusterResult(
            requests,
            max(n.clock for n in self.nodes),
            sum(n.busy for n in self.nodes),
            sum(n.preemptions for n in self.nodes),
            [self.node_summary(i) for i in range(len(self.nodes))],
        )

    def drain(self, specs: list[RequestSpec]) -> list[Request]:
        """Every live node runs out its work; returns every request ended, each exactly once."""
        for i, n in enumerate(self.nodes):
            if self.alive[i]:
                n.drain()
        requests = [r for n in self.nodes for r in n.done] + self.ended
        ended = sorted(r.request_id for r in requests)
        if ended != sorted(s.request_id for s in specs):
            raise RuntimeError(f"the cluster ended {len(ended)} requests ({len(set(ended))} distinct) of {len(specs)}")
        return requests

    def node_summary(self, i: int) -> dict:
        n = self.nodes[i]
        return {
            "node": n.name,
            "policy": n.policy.name,
            "alive": self.alive[i],
            "finished": len(n.done),
            "iterations": n.iterations,
            "busy_s": n.busy,
            "preemptions": n.preemptions,
        }

    def publish(self, t: float) -> None:
        for i, n in enumerate(self.nodes):
            if not self.alive[i]:
                continue  # a dead node answers nothing
            report = node_report(n, i, t, self.cfg.slo.ttft, self.router.needs_budget)
            history = self.reports[i]
            history.append(report)
            # Keep only what the delayed view can still need.
            while len(history) > 2 and history[1].time <= t - self.cfg.report_delay - self.cfg.report_interval:
                history.pop(0)

    def visible(self, t: float) -> list[NodeReport]:
        """What the router has received by ``t``: each node's newest report published by ``t - delay``,
        read through the config's ``ReportAging`` (stale budgets shrink; silent nodes drop out)."""
        aging = self.cfg.aging
        cutoff = t - self.cfg.report_delay
        out = []
        for history in self.reports:
            seen = [r for r in history if r.time <= cutoff + 1e-12]
            if seen and (r := aging.read(seen[-1], t)) is not None:
                out.append(r)
        return out

    def dispatch(self, spec: RequestSpec, t: float, attempt: Request | None) -> None:
        slo = spec.slo or self.cfg.slo
        views = self.visible(t)
        cfg, n = self.cfg, spec.prompt_len
        hashes: tuple[int, ...] = ()
        if cfg.prefix_caching and spec.prefix:
            bs = self.nodes[0].kv.block_size
            hashes = spec.block_hashes(bs)
        blocks = hashes[: n // self.nodes[0].kv.block_size]
        routed = route(self.router, views, n, spec.arrival, slo.ttft, t, cfg.admission, cfg.report_interval, blocks)
        if routed.retry_at is not None:
            self.push(routed.retry_at, _RETRY, (spec, attempt))
            return
        if routed.refusal is not None:
            self.end(spec, RequestStatus.REJECTED, routed.refusal)
            return
        node_index = routed.node
        if not self.alive[node_index]:
            self.lost(spec, t, f"sent to node {node_index}, which had stopped answering")
            return
        node = self.nodes[node_index]
        node.advance_to(t)
        if cfg.failures:
            self.sent[spec.request_id] = spec
        node.submit(node.new_request(spec.request_id, spec.arrival, n, spec.slo, hashes), spec.output_len)

    def fail(self, index: int, t: float) -> None:
        if not self.alive[index]:
            return
        self.alive[index] = False
        node = self.nodes[index]
        for r in node.running + node.waiting + node.deferred:
            node.kv.free(r)
            spec = self.sent.pop(r.request_id)
            if r.token_times or self.cfg.on_failure == "fail":
                r.status, r.finish_reason = RequestStatus.FAILED, f"node {index} failed at {t:.3f} s"
                self.ended.append(r)
            else:
                self.push(t, _RETRY, (spec, None))
        node.running.clear()
        node.waiting.clear()
        node.deferred.clear()

    def lost(self, spec: RequestSpec, t: float, reason: str) -> None:
        if self.cfg.on_failure == "retry":
            self.push(t + self.cfg.report_interval, _RETRY, (spec, None))
        else:
            self.end(spec, RequestStatus.FAILED, reason)

    def end(self, spec: RequestSpec, status: RequestStatus, reason: str) -> None:
        self.ended.append(ended_request(spec, self.cfg.slo, status, reason))


def homogeneous(n: int, policy: str, profile: str | None = None) -> tuple[NodeSpec, ...]:
    return tuple(NodeSpec(policy, profile) for _ in range(n))
