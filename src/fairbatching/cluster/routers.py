"""Routers: pick a node for each arriving request from the nodes' last reports.

Every router sees the same thing a real one would: a ``NodeReport`` per node, published every reporting
interval and delivered after a delay, never the nodes' live state. A node whose last report is older
than the staleness limit is treated as down (no new requests), the conservative reading of silence.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fairbatching.errors import ConfigError
from fairbatching.policies.admission import AdmissionBudget


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: int
    time: float
    outstanding: int  # running + waiting requests (vLLM's num_requests_running + waiting)
    queued_tokens: int  # prompt tokens still to prefill
    kv_used_tokens: int
    budget: AdmissionBudget | None


class Router(ABC):
    name = "router"
    needs_budget = False

    @abstractmethod
    def choose(self, prompt_tokens: int, reports: list[NodeReport]) -> int | None:
        """Index into ``reports`` of the chosen node, or None to refuse the request."""

    @abstractmethod
    def note_dispatch(self, report_index: int, prompt_tokens: int) -> None:
        """Told after each dispatch, so a router can count what it sent since the last report."""


class _SentSinceReport(Router):
    """Counts what this router sent to each node since that node's last report, so a burst between
    reports is not all sent to the node that looked idlest (as llm-d-style scorers do)."""

    def __init__(self) -> None:
        self._sent: dict[tuple[int, float], tuple[int, int]] = {}
        self._last: list[NodeReport] = []

    def pending(self, r: NodeReport) -> tuple[int, int]:
        return self._sent.get((r.node, r.time), (0, 0))

    def note_dispatch(self, report_index: int, prompt_tokens: int) -> None:
        r = self._last[report_index]
        n, t = self.pending(r)
        self._sent[(r.node, r.time)] = (n + 1, t + prompt_tokens)


class RoundRobin(_SentSinceReport):
    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, prompt_tokens: int, reports: list[NodeReport]) -> int | None:
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

    def choose(self, prompt_tokens: int, reports: list[NodeReport]) -> int | None:
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

    def choose(self, prompt_tokens: int, reports: list[NodeReport]) -> int | None:
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

    def left(self, r: NodeReport) -> int:
        return (r.budget.tokens if r.budget else 0) - self.pending(r)[1]

    def choose(self, prompt_tokens: int, reports: list[NodeReport]) -> int | None:
        self._last = reports
        if not reports:
            return None
        best = max(range(len(reports)), key=lambda i: self.left(reports[i]))
        if self.admission and self.left(reports[best]) < prompt_tokens:
            return None
        return best


ROUTERS = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "least-tokens": LeastTokens,
    "power-of-two": PowerOfTwo,
    "pab": PABRouter,
}


def make_router(name: str, admission: bool = False, seed: int = 0) -> Router:
    if name == "pab":
        return PABRouter(admission=admission)
    if admission:
        raise ConfigError("admission control needs the pab router (it is the one that sees node budgets)")
    if name == "power-of-two":
        return PowerOfTwo(seed)
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ConfigError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}") from None
