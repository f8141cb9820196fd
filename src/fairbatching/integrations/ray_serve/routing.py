"""What the PAB request router decides, without Ray: replicas' routing stats read as ``NodeReport``s through
the cluster simulator's ``ReportAging`` and ranked by its ``PABRouter`` (one routing core for both), plus the
refusal rules and their counts. ``router.PABRequestRouter`` is the thin Ray Serve adapter around this.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from fairbatching.cluster.routers import NodeReport, PABRouter, ReportAging
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
    """Ranks replicas by the Prefill Admission Budget left since their last report; with admission control
    refuses (``reject``) or holds (``defer``, until it can no longer make its TTFT) what fits nowhere."""

    def __init__(self, aging: ReportAging, admission: Admission = Admission.REJECT) -> None:
        admission = parse_mode(Admission, admission, "admission")
        self.aging = aging
        self.admission = admission
        self.core = PABRouter(admission=admission != "none")
        self.refusals: Counter[str] = Counter()
        self._reports: dict[Hashable, NodeReport] = {}
        self._seen: dict[Hashable, NodeReport] = {}

    def views(self, stats: Mapping[Hashable, Mapping], now: float) -> list[NodeReport]:
        """The reports of ``stats`` (replica -> its routing stats) as a router reads them at ``now``."""
        out = []
        for node, s in stats.items():
            r = self._reports.get(node)
            if r is None or r.time != s.get("time"):
                r = report_from_stats(node, s)
                if r is None:
                    continue
                self._reports[node] = r
            if (v := self.aging.read(r, now)) is not None:
                out.append(v)
        return out

    def decide(
        self,
        prompt_tokens: int,
        deadline: float,
        stats: Mapping[Hashable, Mapping],
        now: float,
        ttft: float | None = None,
    ) -> Decision:
        """Where a request of ``prompt_tokens`` goes; ``deadline`` is its first token's due time, ``ttft`` its
        first-token SLO (admission judges the budget over it, as the cluster simulator does)."""
        views = self.views(stats, now)
        interval = self.aging.interval
        if views:
            order = self.core.ranked(views)
            best = views[order[0]]
            if self.core.admits(prompt_tokens, best, ttft):
                self._seen.update((v.node, v) for v in views)
                return Decision([views[i].node for i in order])
            reason = f"admission control: no replica's prefill budget fits {prompt_tokens} tokens"
            if self.admission == "defer":
                if now + interval < deadline:
                    return Decision([])
                reason += " (deferred until it could no longer make its TTFT)"
        else:
            if now + interval < deadline:
                return Decision([])  # wait for a replica to report, as the cluster simulator does
            if self.admission == "none":
                return Decision(list(stats))  # no admission control: route blind rather than refuse
            reason = "no replica reachable: none has reported within the staleness limit"
        self.refusals[reason] += 1
        return Decision([], reason)

    def note_sent(self, node: Hashable, prompt_tokens: int) -> None:
        """A request went to ``node``: count it against the report the ranking read."""
        if (r := self._seen.get(node)) is not None:
            self.core.note_sent(r, prompt_tokens)

    def forget(self, node: Hashable) -> None:
        self._reports.pop(node, None)
        self._seen.pop(node, None)
        self.core.forget(node)
