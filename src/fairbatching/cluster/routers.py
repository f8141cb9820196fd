"""Routers: pick a node for each arriving request from the nodes' last reports.

Every router sees the same thing a real one would: a ``NodeReport`` per node, published every reporting
interval and delivered after a delay, never the nodes' live state. A node whose last report is older
than the staleness limit is treated as down (no new requests), the conservative reading of silence.
This is the one routing core: the cluster simulator and the Ray Serve router
(``integrations.ray_serve``) both read reports through ``ReportAging`` and rank with these routers.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

from fairbatching.errors import ConfigError
from fairbatching.policies.admission import AdmissionBudget


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: Hashable  # the node's index in the simulator, a replica id under Ray Serve
    time: float
    outstanding: int  # running + waiting requests (vLLM's num_requests_running + waiting)
    queued_tokens: int  # prompt tokens still to prefill
    kv_used_tokens: int
    budget: AdmissionBudget | None


@dataclass(frozen=True, slots=True)
class ReportAging:
    """How a router reads a report of a given age. Fresh (within one interval plus the delivery delay) it
    is taken as is; older (a report went missing) its budget shrinks linearly toward zero; older than the
    staleness limit the node is treated as down."""

    interval: float
    delay: float = 0.0
    stale_after: float | None = None  # default: two intervals plus the delay

    @property
    def staleness(self) -> float:
        return self.stale_after if self.stale_after is not None else 2 * self.interval + self.delay

    def read(self, report: NodeReport, now: float) -> NodeReport | None:
        """``report`` as seen at ``now``: None when the node must be treated as down."""
        age = now - report.time
        staleness = self.staleness
        if age > staleness:
            return None
        fresh = self.interval + self.delay
        b = report.budget
        if b is None or age <= fresh:
            return report
        keep = max(0.0, 1.0 - (age - fresh) / max(staleness - fresh, 1e-9))
        budget = replace(b, seconds=b.seconds * keep, tokens=int(b.tokens * keep), keep=b.keep * keep)
        return replace(report, budget=budget)


class Router(ABC):
    name = "router"
    needs_budget = False

    @abstractmethod
    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        """Index into ``reports`` of the chosen node, or None to refuse the request (``ttft``: its own
        first-token SLO, for routers that weigh budgets over it; ``blocks``: its prompt's block hashes, for
        routers that weigh where its prefix is cached)."""

    @abstractmethod
    def note_dispatch(self, report_index: int, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        """Told after each dispatch, so a router can count what it sent since the last report."""

    @abstractmethod
    def sent(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        """One request went to ``r``'s node: ``note_dispatch`` for a runtime that sends later than it decides,
        naming the report it was ranked on (Ray Serve)."""

    def ranked(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Indices into ``reports``, best first, or None to refuse the request: for a runtime that tries nodes in
        turn (Ray Serve sends to the first with a free slot). Here the chosen node, then the others in order."""
        best = self.choose(prompt_tokens, reports, ttft, blocks)
        return None if best is None else [best, *(i for i in range(len(reports)) if i != best)]


class _SentSinceReport(Router):
    """Counts what this router sent to each node since that node's last report, so a burst between
    reports is not all sent to the node that looked idlest (as llm-d-style scorers do)."""

    def __init__(self) -> None:
        self._sent: dict[Hashable, tuple[float, int, int]] = {}  # node -> (report time, requests, tokens)
        self._last: list[NodeReport] = []

    def pending(self, r: NodeReport) -> tuple[int, int]:
        """Requests and prompt tokens sent to ``r``'s node since ``r`` was published."""
        sent = self._sent.get(r.node)
        return (sent[1], sent[2]) if sent is not None and sent[0] == r.time else (0, 0)

    def note_dispatch(self, report_index: int, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        self.sent(self._last[report_index], prompt_tokens, blocks)

    def sent(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        self.note_sent(r, prompt_tokens)

    def note_sent(self, r: NodeReport, prompt_tokens: int) -> None:
        """One request of ``prompt_tokens`` went to ``r``'s node; a newer report starts the count afresh
        (a node's reports are read in time order, so only the newest count is ever needed)."""
        n, t = self.pending(r)
        self._sent[r.node] = (r.time, n + 1, t + prompt_tokens)

    def forget(self, node: Hashable) -> None:
        """A node left the cluster: drop its count."""
        self._sent.pop(node, None)


class RoundRobin(_SentSinceReport):
    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        self._last = reports
        if not reports:
            return None
        i = self._next % len(reports)
        self._next += 1
        return i


class LeastOutstanding(_SentSinceReport):
    """The node with the fewest requests (reported outstanding plus sent since that report)."""

    name = "least-outstanding"

    def load(self, r: NodeReport) -> float:
        return r.outstanding + self.pending(r)[0]

    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        self._last = reports
        if not reports:
            return None
        return min(range(len(reports)), key=lambda i: self.load(reports[i]))


class LeastTokens(LeastOutstanding):
    """The node with the least token load: queued prompt tokens plus KV in use (vLLM-exported signals)."""

    name = "least-tokens"

    def load(self, r: NodeReport) -> float:
        return r.queued_tokens + r.kv_used_tokens + self.pending(r)[1]


class PowerOfTwo(LeastOutstanding):
    """Two random nodes, the one with fewer outstanding requests."""

    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        self._last = reports
        if not reports:
            return None
        a, b = self._rng.randrange(len(reports)), self._rng.randrange(len(reports))
        return a if self.load(reports[a]) <= self.load(reports[b]) else b


class PABRouter(_SentSinceReport):
    """The node with the largest Prefill Admission Budget left (after what was sent since its report).

    With admission control on, a request whose prompt fits no node's budget is refused (the caller
    rejects or defers it); otherwise it goes to the largest budget anyway.
    """

    name = "pab"
    needs_budget = True

    def __init__(self, admission: bool = False) -> None:
        super().__init__()
        self.admission = admission

    def left(self, r: NodeReport, ttft: float | None = None) -> int:
        """Prompt tokens ``r``'s node can still take, over the reported horizon or over ``ttft``."""
        b = r.budget
        tokens = 0 if b is None else b.tokens if ttft is None else b.tokens_within(ttft)
        return tokens - self.pending(r)[1]

    def need(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int]) -> int:
        """Prompt tokens the request would prefill on ``r``'s node: all of them (no cache is known here)."""
        return prompt_tokens

    def admits(self, prompt_tokens: int, r: NodeReport, ttft: float | None = None) -> bool:
        """Whether a request may go to ``r``'s node: always without admission control, else if it fits
        (within its own ``ttft`` when given)."""
        return not self.admission or self.left(r, ttft) >= prompt_tokens

    def ranked(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Indices into ``reports``, the most budget left after this request first (ties keep report order), or
        None when the first does not admit it."""
        self._last = reports
        if not reports:
            return None
        need = [self.need(r, prompt_tokens, blocks) for r in reports]
        order = sorted(range(len(reports)), key=lambda i: need[i] - self.left(reports[i]))
        return order if self.admits(need[order[0]], reports[order[0]], ttft) else None

    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        order = self.ranked(prompt_tokens, reports, ttft, blocks)
        return None if order is None else order[0]


class PrefixIndex:
    """What a router remembers of the prompt blocks it sent each node, as Ray Serve's PrefixCacheAffinityRouter
    keeps a prefix tree per replica: the router's own record, not the nodes' caches (no engine exports those).
    Each node's record holds at most ``capacity`` blocks (its KV cache), the least recently sent dropped first,
    as the node's LRU would."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"a prefix index needs a positive capacity in blocks, got {capacity}")
        self.capacity = capacity
        self._blocks: dict[Hashable, dict[int, None]] = {}

    def match(self, node: Hashable, blocks: Sequence[int]) -> int:
        """How many leading ``blocks`` were sent to ``node`` and are still remembered."""
        seen = self._blocks.get(node)
        if not seen:
            return 0
        m = 0
        for h in blocks:
            if h not in seen:
                break
            m += 1
        return m

    def record(self, node: Hashable, blocks: Sequence[int]) -> None:
        seen = self._blocks.setdefault(node, {})
        for h in blocks:
            seen.pop(h, None)
            seen[h] = None
        while len(seen) > self.capacity:
            del seen[next(iter(seen))]

    def forget(self, node: Hashable) -> None:
        self._blocks.pop(node, None)


class PrefixAffinity(LeastOutstanding):
    """Ray Serve's PrefixCacheAffinityRouter, on our reports: while the nodes' loads (outstanding requests)
    differ by at most ``imbalance``, the node whose remembered prefix matches the most of this prompt, if
    that is at least ``match_threshold`` of its blocks; otherwise (or with no match) the least-loaded node.
    Ray's defaults: imbalance 10 requests, match threshold 10%. Ray falls back to power of two choices;
    least-outstanding here, which sees every node's report."""

    name = "prefix-affinity"

    def __init__(self, capacity: int = 1 << 20, imbalance: float = 10, match_threshold: float = 0.1) -> None:
        super().__init__()
        self.index = PrefixIndex(capacity)
        self.imbalance = imbalance
        self.match_threshold = match_threshold

    def choose(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> int | None:
        self._last = reports
        if not reports:
            return None
        loads = [self.load(r) for r in reports]
        least = min(range(len(reports)), key=loads.__getitem__)
        if not blocks or max(loads) - loads[least] > self.imbalance:
            return least
        matches = [self.index.match(r.node, blocks) for r in reports]
        best = max(range(len(reports)), key=lambda i: (matches[i], -loads[i]))
        return best if matches[best] and matches[best] >= self.match_threshold * len(blocks) else least

    def sent(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        self.note_sent(r, prompt_tokens)
        self.index.record(r.node, blocks)

    def forget(self, node: Hashable) -> None:
        super().forget(node)
        self.index.forget(node)


class PABAffinity(PABRouter):
    """Affinity first, PAB as the guard. A request goes to its home, the one node that was sent the longest prefix
    of its blocks (per this router's ``PrefixIndex``), while the home's budget within the request's TTFT, charged
    only for the uncached part, still fits it; else to the node with the most budget left after its own uncached
    part (ties: fewer requests), unless no node fits it either (then home: where it costs least). Why (issue 29):
    the caches hold less than the conversations' histories, so moving a turn for a slightly larger budget copies
    its history onto a second node and re-prefills it, and hits fall; a turn moves only when moving makes its
    first token in time. A prefix every node holds (a system prompt) makes no home. With admission control
    the first node must fit the request, else it is refused."""

    name = "pab-affinity"

    def __init__(self, admission: bool = False, capacity: int = 1 << 20, block_size: int = 16) -> None:
        super().__init__(admission)
        self.index = PrefixIndex(capacity)
        self.block_size = block_size

    def need(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int]) -> int:
        """Prompt tokens ``r``'s node must prefill: all but the remembered prefix, and at least one."""
        if not blocks:
            return prompt_tokens
        return max(1, prompt_tokens - self.index.match(r.node, blocks) * self.block_size)

    def ranked(
        self, prompt_tokens: int, reports: list[NodeReport], ttft: float | None = None, blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Indices into ``reports``: the home first where the rule above puts it there, then by budget left after
        the uncached part; None when the first does not admit it."""
        self._last = reports
        if not reports:
            return None
        need = [self.need(r, prompt_tokens, blocks) for r in reports]
        load = [r.outstanding + self.pending(r)[0] for r in reports]
        order = sorted(range(len(reports)), key=lambda i: (need[i] - self.left(reports[i]), load[i]))
        home = min(range(len(reports)), key=lambda i: (need[i], load[i]))
        fits = [self.left(r, ttft) >= n for r, n in zip(reports, need, strict=True)]
        unique = sum(n == need[home] for n in need) == 1
        if unique and (fits[home] or not fits[order[0]]):
            order.remove(home)
            order.insert(0, home)
        return order if self.admits(need[order[0]], reports[order[0]], ttft) else None

    def sent(self, r: NodeReport, prompt_tokens: int, blocks: Sequence[int] = ()) -> None:
        self.note_sent(r, self.need(r, prompt_tokens, blocks))
        self.index.record(r.node, blocks)

    def forget(self, node: Hashable) -> None:
        super().forget(node)
        self.index.forget(node)


ROUTERS = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "least-tokens": LeastTokens,
    "power-of-two": PowerOfTwo,
    "pab": PABRouter,
    "prefix-affinity": PrefixAffinity,
    "pab-affinity": PABAffinity,
}


def make_router(
    name: str, admission: bool = False, seed: int = 0, kv_blocks: int = 1 << 20, block_size: int = 16
) -> Router:
    """A router by name. ``kv_blocks`` and ``block_size``: a node's KV cache, for the routers that remember
    which prefixes they sent where."""
    if name == "pab":
        return PABRouter(admission=admission)
    if name == "pab-affinity":
        return PABAffinity(admission=admission, capacity=kv_blocks, block_size=block_size)
    if admission:
        raise ConfigError("admission control needs the pab router or pab-affinity (they see node budgets)")
    if name == "power-of-two":
        return PowerOfTwo(seed)
    if name == "prefix-affinity":
        return PrefixAffinity(capacity=kv_blocks)
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ConfigError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}") from None
