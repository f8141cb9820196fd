"""FairBatching (Lyu et al., arXiv 2510.14392): adaptive batch capacity and fair three-phase formation."""

from __future__ import annotations

import math
from operator import attrgetter

from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import Request
from fairbatching.costmodel.model import CostModel
from fairbatching.policies.base import BatchBuilder, Policy, SchedulerState

_deadline = attrgetter("next_deadline")


class FairBatchingPolicy(Policy):
    """Shares each iteration's GPU time between prefills and decodes by their envelope deadlines.

    Capacity: the batch may last as long as the tightest decode deadline allows (``min slack``), capped by
    ``max_batch_time`` and the token limit, but never less than the urgent decodes need.
    Formation:
      1. urgent decodes: those that would miss their next deadline if they waited for the next batch;
      2. prefills (ongoing and new), earliest first-token deadline first, chunked to the time budget;
      3. the other decodes, least slack first, in whatever time is left. With no prefill backlog every
         decode runs (skipping one would idle the GPU for nothing).
    """

    name = "fairbatching"

    def __init__(
        self,
        cost_model: CostModel,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        max_batch_time: float | None = None,
        min_chunk: int = 32,
        urgency_margin: float = 1.0,
        edf_window: int = 128,
    ) -> None:
        super().__init__(cost_model, max_num_batched_tokens, max_num_seqs)
        if max_batch_time is not None and max_batch_time <= 0:
            raise ValueError("max_batch_time must be positive")
        self.max_batch_time = math.inf if max_batch_time is None else max_batch_time
        self.min_chunk = min_chunk
        self.urgency_margin = urgency_margin
        self.edf_window = edf_window

    def schedule(self, state: SchedulerState) -> BatchPlan:
        now = state.now
        decodes: list[Request] = []
        prefills: list[Request] = []
        ctx = 0
        for r in state.running:
            if r.num_tokens - r.num_computed == 1 and r.token_times:
                decodes.append(r)
                ctx += r.num_computed + 1
            else:
                prefills.append(r)
        b = self.builder(state)
        budget = self.max_batch_time
        if decodes:
            n = len(decodes)
            decode_time = self.cost_model.predict(n, ctx, n, ctx)
            budget = min(budget, min(map(_deadline, decodes)) - now)
            cutoff = now + max(budget, 0.0) + self.urgency_margin * decode_time
            urgent = [r for r in decodes if r.next_deadline < cutoff]
            if urgent:
                urgent.sort(key=_deadline)
                b.add_decodes(urgent)
            budget = max(budget, b.time())
        backlog = self._add_prefills(b, prefills, state.waiting, budget)
        if len(decodes) > b.seqs or b.plan.preempted:
            self._add_slack_decodes(b, decodes, budget if backlog else math.inf)
        return b.finish()

    def _add_prefills(self, b: BatchBuilder, running: list[Request], waiting: list[Request], budget: float) -> bool:
        """Phase 2, earliest deadline first over ongoing prefills and the head of the queue.

        Only the first ``edf_window`` queued requests are ordered by deadline (bounded look-ahead keeps a
        decision O(window) under overload). Returns True if prefill work is left over, in which case
        decodes with slack must yield the rest of the time budget.
        """
        pool = running + waiting[: self.edf_window] if waiting else running
        if not pool:
            return False
        pool.sort(key=_deadline)
        for r in pool:
            remaining = r.num_tokens - r.num_computed
            if b.full:
                return True
            n = b.largest_chunk(r, min(remaining, b.tokens_left), budget)
            if n < remaining and n < self.min_chunk:
                return True
            if not b.add(r, n, preempt=r.num_blocks > 0) or n < remaining:
                return True
        return len(waiting) > self.edf_window

    def _add_slack_decodes(self, b: BatchBuilder, decodes: list[Request], budget: float) -> None:
        """Phase 3: decodes not yet scheduled, least slack first, as many as fit in ``budget``."""
        scheduled = b.scheduled
        rest = [r for r in decodes if id(r) not in scheduled]
        if not rest:
            return
        if budget == math.inf:
            b.add_decodes(rest)
            return
        ctx = sum(r.num_computed + 1 for r in rest)
        n = len(rest)
        if b.cost.predict(b.new_tokens + n, b.context + ctx, b.seqs + n, b.attn + ctx) > budget:
            rest.sort(key=_deadline)
            n = _max_prefix_within(b, rest, budget)
        b.add_decodes(rest[:n])


def _max_prefix_within(b: BatchBuilder, decodes: list[Request], budget: float) -> int:
    """How many of ``decodes`` (in order) fit in the time budget, by bisection on prefix sums."""
    prefix = [0]
    for r in decodes:
        prefix.append(prefix[-1] + r.num_computed + 1)
    lo, hi = 0, len(decodes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ctx = prefix[mid]
        if b.cost.predict(b.new_tokens + mid, b.context + ctx, b.seqs + mid, b.attn + ctx) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
