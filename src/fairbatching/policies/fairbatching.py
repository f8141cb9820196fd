"""FairBatching (Lyu et al., arXiv 2510.14392): adaptive batch capacity and fair three-phase formation."""

from __future__ import annotations

import heapq
import math
from itertools import accumulate
from operator import attrgetter
from typing import Any

from fairbatching.config import FairBatchingConfig
from fairbatching.core.envelope import count_urgent
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import Request
from fairbatching.costmodel.model import BatchPricer, CostModel, attn_work
from fairbatching.policies.base import BatchBuilder, Policy, SchedulerState, count_crossing, total_computed

_REF_ATTN = attn_work(1024, 0)  # a 1024-token prefill from scratch: where calibration's scale is read


def _admit(b: BatchBuilder, r: Request, n: int, reserve: int) -> bool:
    """``r`` joins the running set with ``n`` tokens, leaving ``reserve`` blocks free; a reserve never keeps out a
    request the whole cache could hold. (A failed ``add`` changes nothing, so the capped retry is only paid for
    when the first try fails.)"""
    if b.add(r, n, reserve=reserve):
        return True
    cap = b.state.kv.num_blocks - b.blocks_needed(r, n)
    return 0 <= cap < reserve and b.add(r, n, reserve=cap)


def _deadline(r: Request) -> float:
    """The sort key of deadline order (a typed function: compiled, it reads the field without a lookup)."""
    return r.next_deadline


_computed = attrgetter("num_computed")


class FairBatchingPolicy(Policy):
    """Shares each iteration's GPU time between prefills and decodes by their envelope deadlines.

    Capacity: the batch may last as long as the tightest decode deadline allows (``min slack``), capped by
    ``max_batch_time`` and the token limit, but never less than the urgent decodes need, nor less than
    ``min_budget_fraction`` of the tightest TPOT SLO: a deadline already missed cannot be saved, and letting
    it shrink every batch to a few decodes would collapse throughput exactly when the node is behind. Above 1
    the floor lets steps outlast the tightest decode deadline: decodes give up TPOT so prefills run in larger,
    cheaper chunks (lower TTFT), the trade vLLM's token budget makes.
    Formation:
      1. urgent decodes: those that would miss their next deadline if they waited for the next batch;
      2. prefills (ongoing and new), earliest first-token deadline first, chunked to the time budget; a
         new request is admitted only while the blocks that this iteration's other decodes need (plus
         ``kv_reserve_fraction`` of the cache) stay free, so admissions never force a decode out. Where the
         cost model prices mixing (``t_mixed``: the engine runs decode-only steps as one CUDA graph), the
         first chunk of a step must be worth ``mixed_amortization`` times that price, or the prefill waits
         for a step with room for it: slivers of prefill would pay the price over and over;
      3. the other decodes, least slack first, in whatever time is left. Only decodes with more than
         ``yield_reserve`` TPOTs of slack beyond this step yield it to a prefill backlog: a yielded decode
         comes back just before its deadline, so with no reserve every step that runs longer than the
         model said (on hardware many do) makes it late, and late decodes shrink every later budget
         (results/model-error). Decodes yield only while KV use is below ``kv_high_watermark`` (default half) of
         the KV blocks and of the ``max_num_seqs`` slots: a held-back decode stays resident longer, so under
         KV or slot pressure yielding stalls admissions (Little's law).
    Prefills whose first-token deadline is already lost go after those that can still make theirs
    (``late_last``): plain EDF serves the late ones first and, under a burst, makes every request late.
    "Can still make it" is judged with the queue ahead (``queue_margin``; null: alone): served in deadline
    order at the share of the GPU the decodes leave, each first token at the end of a step, the most that can
    all be on time stay feasible (Moore-Hodgson: where one would be late, the longest so far gives way). EDF
    alone serves a long prompt that just makes it and lets the short ones behind it miss by a step.
    Passed over without limit, though, a lost request's TTFT grows with the backlog (the P99 TTFT tail):
    ``late_age_limit`` (in TTFT SLOs waited) puts one that has waited that long back in deadline order.
    Promoted ahead of every feasible prefill, though, aged requests take whole steps under overload and make
    the feasible ones late in turn: ``late_share`` caps the aged ones (earliest deadline first) to that
    fraction of each step's prefill time, a reserved share; feasible prefills take the rest, then the aged
    ones left over, then the other late ones. With ``late_age_limit=1`` every lost request is aged.
    """

    name = FairBatchingConfig.policy
    config_type = FairBatchingConfig

    def __init__(self, cost_model: BatchPricer, config: FairBatchingConfig | None = None, **options: Any) -> None:
        """``config`` (default: the declared defaults) with ``options`` by name on top (see ``config.py``)."""
        cfg = FairBatchingConfig.resolve(config, options)
        super().__init__(cost_model, cfg, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.late_last = cfg.late_last
        self.late_age_limit = cfg.late_age_limit
        self.late_share = cfg.late_share
        self.queue_margin = cfg.queue_margin
        # What online calibration scales, priced at a reference prefill (queue feasibility).
        self._prior_ref = CostModel(cost_model.params).predict(1024, 1024, 1, _REF_ATTN)
        self.yield_reserve = cfg.yield_reserve
        self.mixed_amortization = cfg.mixed_amortization
        self.max_batch_time = math.inf if cfg.max_batch_time is None else cfg.max_batch_time
        self.min_chunk = cfg.min_chunk
        self.urgency_margin = cfg.urgency_margin
        self.edf_window = cfg.edf_window
        self.slack_carry = cfg.slack_carry
        self.min_budget_fraction = cfg.min_budget_fraction
        self.kv_reserve_fraction = cfg.kv_reserve_fraction
        self.kv_high_watermark = cfg.kv_high_watermark
        self.decode_grace = cfg.decode_grace

    def schedule(self, state: SchedulerState) -> BatchPlan:
        """The step's capacity, then its three phases (see the class doc): urgent decodes, prefills in deadline
        order, and the decodes with slack in the time left."""
        decodes, prefills, computed, tpot = _split_running(state.running)
        b = self.builder(state)
        budget = prefill_budget = self.max_batch_time
        n_urgent = 0
        may_yield = True
        horizon = (0.0, 1.0)  # a step's length and the prefills' share of the GPU (queue feasibility)
        if decodes:
            decodes.sort(key=_deadline)  # our own list: urgent decodes are a prefix, slack ones the rest
            budget, full_batch, all_decodes, may_yield = self._capacity(state, decodes, computed, tpot)
            if self.queue_margin is not None and (prefills or state.waiting):
                horizon = (budget, self._prefill_share(decodes, computed, tpot, budget, may_yield))
            margin = self.urgency_margin * all_decodes + (self.yield_reserve * tpot if may_yield else 0.0)
            n_urgent, computed = self._add_urgent_decodes(b, decodes, computed, budget, margin)
            budget = prefill_budget = max(budget, b.time())
            if not may_yield and n_urgent < len(decodes) and budget < full_batch:
                prefill_budget -= self._other_decodes_time(b, decodes, n_urgent, all_decodes)
        backlog = self._add_prefills(b, prefills, state.waiting, prefill_budget, decodes, n_urgent, horizon)
        if n_urgent < len(decodes):
            rest, computed = _not_preempted(b.plan, decodes[n_urgent:], computed)
            self._add_slack_decodes(b, rest, budget if backlog and may_yield else math.inf, computed)
        return b.finish()

    def _capacity(
        self, state: SchedulerState, decodes: list[Request], computed: int, tpot: float
    ) -> tuple[float, float, float, bool]:
        """How long this step may last, and what decides it: ``(budget, full_batch, all_decodes, may_yield)``.

        The budget is the tightest decode deadline's lead (``decodes`` in deadline order, their
        ``num_computed`` summing to ``computed``), never below ``min_budget_fraction`` of the tightest TPOT
        (``tpot``), capped by ``max_batch_time`` and by the time of a batch at the token cap (``full_batch``).
        ``all_decodes``: the time of a step of every decode alone. ``may_yield``: KV and slot use are below
        ``kv_high_watermark``, so decodes with slack may yield to prefills.
        """
        n = len(decodes)
        ctx = computed + n
        # No batch can outlast one at the token cap, so deadlines beyond that are not urgent.
        cap = self.max_num_batched_tokens
        full_batch = self.cost_model.predict(cap, ctx + cap, n + 1, ctx + attn_work(max(cap - n, 0), 0))
        lead = max(decodes[0].next_deadline - state.now, self.min_budget_fraction * tpot)
        budget = min(self.max_batch_time, full_batch, lead)
        kv = state.kv
        pressure = max(1.0 - kv.free_blocks / kv.num_blocks, len(state.running) / self.max_num_seqs)
        may_yield = pressure < self.kv_high_watermark
        all_decodes = self.cost_model.predict(n, ctx, n, ctx)
        return budget, full_batch, all_decodes, may_yield

    def _add_urgent_decodes(
        self, b: BatchBuilder, decodes: list[Request], computed: int, budget: float, margin: float
    ) -> tuple[int, int]:
        """Phase 1: the decodes whose next token, were they skipped now, would come after the budget and the
        margin (the next step): a prefix of ``decodes`` in deadline order. Returns how many, and the
        ``num_computed`` sum of the rest (``computed``: that of all)."""
        n_urgent = count_urgent(decodes, b.state.now, budget, margin, key=_deadline)
        if not n_urgent:
            return 0, computed
        urgent = decodes[:n_urgent]
        # Context sums of the urgent prefix and the rest, summing only the shorter side.
        if n_urgent <= len(decodes) - n_urgent:
            computed_rest = computed - total_computed(urgent)
        else:
            computed_rest = total_computed(decodes[n_urgent:])
        b.add_decodes(urgent, fresh=True, computed=computed - computed_rest)
        return n_urgent, computed_rest

    def _other_decodes_time(self, b: BatchBuilder, decodes: list[Request], n_urgent: int, all_decodes: float) -> float:
        """What the decodes not yet in the batch add to its time. When decodes may not yield, every decode runs
        in this step, so the prefills get the budget less this."""
        first = decodes[0].num_computed + 1
        base = b.time() if n_urgent else self.cost_model.predict(1, first, 1, first)
        return max(0.0, all_decodes - base)

    def _decode_block_reserve(self, b: BatchBuilder, decodes: list[Request], n_urgent: int, admitting: int) -> int:
        """Blocks the not-yet-scheduled decodes need this iteration, plus ``kv_reserve_fraction`` of the cache.

        Counting them is a pass over every decode; when even one block per decode leaves room for what
        could be admitted (``admitting`` blocks), that upper bound decides the same and is free.
        """
        extra = int(self.kv_reserve_fraction * b.state.kv.num_blocks)
        upper = len(decodes) - n_urgent
        if b.free_blocks >= upper + extra + admitting:
            return upper + extra
        return count_crossing(decodes[n_urgent:], b.block_size) + extra

    def _add_prefills(
        self,
        b: BatchBuilder,
        running: list[Request],
        waiting: list[Request],
        budget: float,
        decodes: list[Request],
        n_urgent: int,
        horizon: tuple[float, float],
    ) -> bool:
        """Phase 2, earliest deadline first over ongoing prefills and the head of the queue.

        Only the first ``edf_window`` queued requests are ordered by deadline (bounded look-ahead keeps a
        decision O(window) under overload). Returns True if prefill work is left over, in which case
        decodes with slack must yield the rest of the time budget.
        """
        pool = running + waiting[: self.edf_window] if waiting else running
        if not pool:
            return False
        admitting = b.tokens_left // b.block_size + len(pool)
        reserve = self._decode_block_reserve(b, decodes, n_urgent, admitting) if waiting else 0
        pool.sort(key=_deadline)
        if self.late_last:
            pool = self._late_last(b, pool, budget, reserve, horizon)
        first_chunk = self._first_chunk_floor()
        blocked = False
        for r in pool:
            remaining = r.num_tokens - r.num_computed
            if b.full:
                return True
            n = b.largest_chunk(r, min(remaining, b.tokens_left), budget)
            # The first-chunk floor holds only while the request can afford to wait for a roomier step.
            opens_mixed = b.new_tokens <= b.seqs and r.first_deadline > b.state.now + budget
            if n < remaining and n < (first_chunk if opens_mixed else self.min_chunk):
                return True
            if r.num_blocks > 0:  # mid-prefill: it grows, preempting if it must
                if not b.add(r, n, preempt=True) or n < remaining:
                    return True
            elif not blocked:  # requests join the running set in deadline order: none past one that cannot
                if not _admit(b, r, n, reserve):
                    if decodes or b.seqs:  # the KV freed goes to this request first: the rest waits for it
                        return True
                    # Else the step would be empty and no decode frees KV: the prefills holding it must go on.
                    blocked = True
                elif n < remaining:
                    return True
        return blocked or len(waiting) > self.edf_window

    def _late_last(
        self, b: BatchBuilder, pool: list[Request], budget: float, reserve: int, horizon: tuple[float, float]
    ) -> list[Request]:
        """``pool`` (in deadline order) with the prefills that can still make their TTFT first and the lost ones
        last; lost ones past the age limit are scheduled here first, within their share of the prefill time."""
        aged, feasible, late = self._feasible_first(pool, b.state.now)
        margin = self.queue_margin
        if margin is not None and len(feasible) > 1:
            feasible, doomed = self._most_on_time(feasible, b.state.now + margin * horizon[0], horizon[1])
            late = sorted(doomed + late, key=_deadline) if doomed else late
        if aged:
            start = b.time()
            aged = aged[self._add_aged(b, aged, start + self.late_share * max(budget - start, 0.0), reserve) :]
        return feasible + aged + late

    def _add_aged(self, b: BatchBuilder, aged: list[Request], cap: float, reserve: int) -> int:
        """Aged prefills, in order, while the step's predicted time stays within ``cap``; returns how many were
        scheduled (the last one perhaps in part)."""
        served = 0
        for r in aged:
            remaining = r.num_tokens - r.num_computed
            if b.full:
                break
            n = b.largest_chunk(r, min(remaining, b.tokens_left), cap)
            if n < remaining and n < self.min_chunk:
                break
            held = r.num_blocks > 0
            if not b.add(r, n, preempt=held, reserve=0 if held else reserve):
                break
            served += 1
            if n < remaining:
                break
        return served

    def _feasible_first(self, pool: list[Request], now: float) -> tuple[list[Request], list[Request], list[Request]]:
        """Prefills whose first-token deadline is lost and that waited ``late_age_limit`` TTFT SLOs (aged),
        those that can still make it (feasible), and the other late ones, each in deadline order. A request
        whose TTFT is lost can no longer meet its SLO; serving it first, as plain EDF does, makes the next
        ones late too and under a burst every request misses (the domino effect of EDF in overload). Late
        ones still run, in the time the feasible ones leave."""
        predict = self.cost_model.predict
        # The least time the rest of a prompt can take is alone in a step. The model grows with new tokens,
        # context and attention work alike (for chunks of 2+ tokens: one step kind), so pricing the longest
        # rest over the deepest prefix bounds them all and clears most of a long queue without pricing each.
        most_new = max([r.num_tokens - r.num_computed for r in pool])
        most_done = max([r.num_computed for r in pool])
        clear = now + predict(most_new, most_done + most_new, 1, most_new * (most_done + (most_new + 1) * 0.5))
        aged: list[Request] = []
        feasible: list[Request] = []
        late: list[Request] = []
        limit = self.late_age_limit
        for r in pool:
            d = r.first_deadline
            if d <= now:  # already lost, however fast it could run (``clear`` is never before ``now``)
                (aged if limit is not None and now - r.arrival >= limit * r.slo.ttft else late).append(r)
            elif d > clear and r.num_tokens - r.num_computed > 1:
                feasible.append(r)
            else:  # ``attn_work(n, c)`` inlined
                c = r.num_computed
                n = r.num_tokens - c
                (late if d <= now + predict(n, c + n, 1, n * (c + (n + 1) * 0.5)) else feasible).append(r)
        return aged, feasible, late

    def _prefill_share(
        self, decodes: list[Request], computed: int, tpot: float, budget: float, may_yield: bool
    ) -> float:
        """The share of GPU time prefills get while these decodes keep their pace: each decode needs a token per
        TPOT (per step when decodes may not yield), and every step of ``budget`` pays its fixed costs."""
        cost = self.cost_model
        n = len(decodes)
        ctx = computed + n
        pair = attn_work(2, 0)
        fixed = cost.predict(2, 2, 1, pair)
        decode_part = max(cost.predict(n + 2, ctx + 2, n + 1, ctx + pair) - fixed, 0.0)
        period = tpot if may_yield else budget
        share = 1.0 - decode_part / max(period, 1e-9) - fixed / max(budget, 1e-9)
        return min(max(share, 0.05), 1.0)

    def _most_on_time(self, feasible: list[Request], start: float, share: float) -> tuple[list[Request], list[Request]]:
        """The most of ``feasible`` (deadline order) that can all make their first token, served in that order
        from ``start`` (now plus ``queue_margin`` step budgets: a first token comes at the end of a step) at
        ``share`` of the GPU (Moore-Hodgson: where one would be late, the longest so far gives way); and the
        others, which cannot."""
        # Each prompt's work at the model's marginal rates (linear: for p > 1 an upper bound on what it adds to a
        # step), scaled as the planner's model scales the prior (online calibration) and by the GPU share.
        cost = self.cost_model
        params = cost.params
        scale = cost.predict(1024, 1024, 1, _REF_ATTN) / self._prior_ref / share
        per_token = (params.c_tok + params.c_kv) * scale
        per_context = params.c_kv * scale
        per_pair = params.c_attn * scale
        clock = start
        longest: list[tuple[float, int]] = []
        gives_way = [False] * len(feasible)
        any_gave_way = False
        for i, r in enumerate(feasible):
            c = r.num_computed
            n = r.num_tokens - c
            work = per_token * n + per_context * c + per_pair * n * (c + (n + 1) * 0.5)
            clock += work
            if clock > r.first_deadline:  # one heap operation: add it, and the longest so far gives way
                most, j = heapq.heappushpop(longest, (-work, i))
                clock += most
                gives_way[j] = any_gave_way = True
            else:
                heapq.heappush(longest, (-work, i))
        if not any_gave_way:
            return feasible, []
        keep = [r for i, r in enumerate(feasible) if not gives_way[i]]
        return keep, [r for i, r in enumerate(feasible) if gives_way[i]]

    def _first_chunk_floor(self) -> int:
        """Smallest partial chunk worth opening a mixed step for: ``mixed_amortization`` x the model's
        ``t_mixed`` in prefill time, at most half the token cap (``min_chunk`` when mixing is free)."""
        cost = self.cost_model
        t_mixed = cost.params.t_mixed
        if not t_mixed or not self.mixed_amortization:
            return self.min_chunk
        # Marginal prefill time per token, between 1k- and 2k-token chunks (fixed costs cancel out).
        per_token = (
            cost.predict(2048, 2048, 1, attn_work(2048, 0)) - cost.predict(1024, 1024, 1, attn_work(1024, 0))
        ) / 1024
        floor = math.ceil(self.mixed_amortization * t_mixed / max(per_token, 1e-12))
        return max(self.min_chunk, min(floor, self.max_num_batched_tokens // 2))

    def _add_slack_decodes(self, b: BatchBuilder, rest: list[Request], budget: float, computed: int) -> None:
        """Phase 3: the decodes not yet scheduled (least slack first, their ``num_computed`` summing to
        ``computed``), as many as fit in ``budget``."""
        if not rest:
            return
        if budget != math.inf:
            n = len(rest)
            ctx = computed + n
            if b.cost.predict(b.new_tokens + n, b.context + ctx, b.seqs + n, b.attn + ctx) > budget:
                prefix = [0, *accumulate(map(_computed, rest))]
                k = _max_prefix_within(b, prefix, budget)
                rest, computed = rest[:k], prefix[k]
        b.add_decodes(rest, fresh=True, computed=computed)


def _split_running(running: list[Request]) -> tuple[list[Request], list[Request], int, float]:
    """The running decodes and prefills, the decodes' ``num_computed`` summed and their tightest TPOT: one pass,
    since it runs over every running request every step."""
    decodes: list[Request] = []
    prefills: list[Request] = []
    computed = 0
    tpot = math.inf
    for r in running:
        if r.num_tokens - r.num_computed == 1 and r.token_times:  # ``Request.is_decode``, inlined
            decodes.append(r)
            computed += r.num_computed
            if r.tpot < tpot:
                tpot = r.tpot
        else:
            prefills.append(r)
    return decodes, prefills, computed, tpot


def _not_preempted(plan: BatchPlan, rest: list[Request], computed: int) -> tuple[list[Request], int]:
    """``rest`` (their ``num_computed`` summing to ``computed``) less any request the plan preempted for KV."""
    if plan.preempted:
        gone = set(map(id, plan.preempted))
        kept = [r for r in rest if id(r) not in gone]
        if len(kept) < len(rest):
            return kept, total_computed(kept)
    return rest, computed


def _max_prefix_within(b: BatchBuilder, prefix: list[int], budget: float) -> int:
    """How many decodes (in order, ``prefix[k]``: the ``num_computed`` of the first k) fit in the time budget,
    by bisection."""
    lo, hi = 0, len(prefix) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ctx = prefix[mid] + mid
        if b.cost.predict(b.new_tokens + mid, b.context + ctx, b.seqs + mid, b.attn + ctx) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
