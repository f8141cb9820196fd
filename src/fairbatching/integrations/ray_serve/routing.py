"""What the PAB request router decides, without Ray: replicas' routing stats read as ``NodeReport``s and ranked
by the cluster simulator's ``PABRouter`` (one ranking, admission check and count of what was sent since each
report for both), plus the refusal rule and its counts. ``router.PABRequestRouter`` is the thin Ray Serve adapter
around this.

Unlike the cluster simulator, which reads reports through ``ReportAging`` (stale budgets shrink, a silent node is
treated as down), this reads each replica's last report as it is, however old: Ray tells the router which
replicas run (a dead one leaves the candidates), and on a loaded machine Ray's controller delivers reports late,
so judging by age refused requests that every replica had room for. A late report is not over-trusted either:
what was sent to a replica since its report counts against that report's budget until a newer one arrives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from fairbatching.cluster.routers import NodeReport, make_router
from fairbatching.core.modes import Admission, parse_mode
from fairbatching.policies.admission import AdmissionBudget


class RoutingRefused(Exception):
    """The router refused a request (HTTP 429); ``retry_after`` is when fresh reports may let it in."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after

    def __reduce__(self):
        return (RoutingRefused, (self.reason, self.retry_after))

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


def report_from_stats(node: Hashable, stats: Mapping) -> NodeReport | None:
    """A replica's ``record_routing_stats`` dict as a ``NodeReport``; None before its first report."""
    if not stats or "time" not in stats:
        return None
    b = stats.get("budget")
    budget = AdmissionBudget(**b) if b else None
    return NodeReport(
        node, stats["time"], stats["outstanding"], stats["queued_tokens"], stats["kv_used_tokens"], budget
    )


@dataclass(frozen=True)
class Decision:
    order: list[Hashable]  # replicas best first; empty when the request waits or is refused
    refusal: str | None = None  # set: refuse with this reason; unset with no order: wait for fresh reports


class PABRanking:
    """Ranks replicas by the Prefill Admission Budget of their last report, less what was sent to them since;
    with admission control refuses (``reject``) or holds (``defer``, while a fresh report can still come before
    its TTFT is lost) what fits nowhere. The only refusal is admission control: before any replica has reported
    (just deployed) there is nothing to judge by, and a request goes to the replica sent the fewest so far.

    ``interval`` is the replicas' report period and ``delay`` how late reports arrive: together, how long until
    a fresh report can be expected (the deferral window and a refusal's Retry-After).

    ``router`` is the cluster simulator's router that ranks: ``pab``, ``pab-affinity`` (a replica's budget after
    the part of the prompt not cached there) or ``prefix-affinity`` (where the prefix is, while loads stay
    within bounds; no admission control). Both affinity routers know a replica's cache as Ray Serve's
    PrefixCacheAffinityRouter does: by the prompt blocks they sent it (at most ``kv_blocks`` of ``block_size``
    tokens per replica, least recently sent dropped first)."""

    def __init__(
        self,
        admission: Admission = Admission.REJECT,
        interval: float = 0.5,
        delay: float = 0.0,
        router: str = "pab",
        kv_blocks: int = 1 << 20,
        block_size: int = 16,
    ) -> None:
        self.admission = parse_mode(Admission, admission, "admission")
        self.interval = interval
        self.delay = delay
        self.core = make_router(router, self.admission != "none", kv_blocks=kv_blocks, block_size=block_size)
        self.refusals: Counter[str] = Counter()
        self.sent: Counter[Hashable] = Counter()  # requests sent to each replica (the order before any report)
        self._reports: dict[Hashable, NodeReport] = {}

    @property
    def wait(self) -> float:
        """Seconds until a fresh report can be expected."""
        return self.interval + self.delay

    def views(self, stats: Mapping[Hashable, Mapping]) -> list[NodeReport]:
        """The last report of each replica in ``stats`` (replica -> its routing stats) that has reported."""
        out = []
        for node, s in stats.items():
            r = self._reports.get(node)
            if r is None or r.time != s.get("time"):
                r = report_from_stats(node, s)
                if r is None:
                    continue
                self._reports[node] = r
            out.append(r)
        return out

    def decide(
        self,
        prompt_tokens: int,
        deadline: float,
        stats: Mapping[Hashable, Mapping],
        now: float,
        ttft: float | None = None,
        blocks: Sequence[int] = (),
    ) -> Decision:
        """Where a request of ``prompt_tokens`` goes; ``deadline`` is its first token's due time, ``ttft`` its
        first-token SLO (admission judges the budget over it, as the cluster simulator does), ``blocks`` its
        prompt's block hashes (with prefix caching)."""
        views = self.views(stats)
        if not views:  # no replica has reported yet: unranked, the least sent first (ties in Ray's order)
            return Decision(sorted(stats, key=lambda node: self.sent[node]))
        order = self.core.ranked(prompt_tokens, views, ttft, blocks)
        if order is not None:
            return Decision([views[i].node for i in order])
        reason = f"admission control: no replica's prefill budget fits {prompt_tokens} tokens"
        if self.admission == "defer":
            if now + self.wait < deadline:
                return Decision([])  # held: a fresh report may fit it
            reason += " (deferred until it could no longer make its TTFT)"
        self.refusals[reason] += 1
        return Decision([], reason)

    def note_sent(self, node: Hashable, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        """A request went to ``node``: count it against the last report read from ``node`` (and remember its
        prompt blocks there, for the affinity routers)."""
        self.sent[node] += 1
        if (r := self._reports.get(node)) is not None:
            self.core.sent(r, prompt_tokens, blocks)

    def forget(self, node: Hashable) -> None:
        self._reports.pop(node, None)
        self.sent.pop(node, None)
        self.core.forget(node)
