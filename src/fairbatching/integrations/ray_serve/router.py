"""``PABRequestRouter``: FairBatching-PAB routing and admission as a Ray Serve ``RequestRouter`` (alpha API,
checked against ray 2.60).

Replicas report their load and Prefill Admission Budget through ``record_routing_stats``; Ray's controller
collects them every ``request_routing_stats_period_s`` and hands them to this router. Each request gets a
ranking of replicas, one per rank, largest budget left first (Ray sends it to the first that has a free
slot). Before any replica has reported, the one sent the fewest requests comes first. A request refused by
admission control (the router's only refusal) has its future fail with ``RoutingRefused`` (the endpoint
answers 429 with Retry-After); a deferred one is routed again after Ray's back-off.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fairbatching.integrations.ray_serve.routing import PABRanking, RoutingRefused


class PABRequestRouter(RequestRouter):
    """Routes by the replicas' last reported Prefill Admission Budget (see ``routing.PABRanking``).

    ``request_router_kwargs``: ``admission`` (none, reject, defer), ``report_interval`` (the stats period),
    ``report_delay`` (how late stats arrive; with the period, how long a deferred request may wait for a fresh
    report, and a refusal's Retry-After), ``router`` (pab, pab-affinity, prefix-affinity) with ``kv_blocks`` and
    ``block_size`` (a replica's KV cache, for the affinity routers). A report is read however old it is (see
    ``routing``).
    """

    def initialize_state(
        self,
        admission: str = "reject",
        report_interval: float = 0.5,
        report_delay: float = 0.2,
        router: str = "pab",
        kv_blocks: int = 1 << 20,
        block_size: int = 16,
    ) -> None:
        self.ranking = PABRanking(admission, report_interval, report_delay, router, kv_blocks, block_size)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or pending_request.future.done() or not candidate_replicas:
            return [candidate_replicas]  # nothing to decide (a refused request: Ray's loop sees it is done)
        job = pending_request.args[0]
        by_id = {r.replica_id: r for r in candidate_replicas}
        stats = {r.replica_id: r.routing_stats for r in candidate_replicas}
        now = self._get_curr_time_s()
        deadline = job["arrival"] + job["ttft"]
        decision = self.ranking.decide(job["prompt_tokens"], deadline, stats, now, job["ttft"], job.get("blocks", ()))
        if decision.order:
            return [[by_id[k]] for k in decision.order]
        if decision.refusal is not None:
            pending_request.future.set_exception(RoutingRefused(decision.refusal, self.ranking.wait))
            self._remove_pending_request_from_indices(pending_request)
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True
        return []

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        job = pending_request.args[0]
        self.ranking.note_sent(replica_id, job["prompt_tokens"], job.get("blocks", ()))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.ranking.forget(replica_id)
