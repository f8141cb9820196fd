"""What every policy shares: the base class, and a builder that enforces budgets, KV and preemption.

The state a policy sees is ``core.state.SchedulerState`` (kept importable from here)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from mypy_extensions import mypyc_attr

from fairbatching.config import PolicyConfig
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import Request
from fairbatching.core.state import SchedulerState
from fairbatching.costmodel.adaptive import AdaptiveCostModel
from fairbatching.costmodel.model import BatchPricer
from fairbatching.policies.admission import AdmissionBudget, prefill_admission_budget


@mypyc_attr(allow_interpreted_subclasses=True)  # users' own policies subclass it
class Policy(ABC):
    """A batch-formation policy. One ``schedule`` call plans one iteration."""

    name: str = "policy"
    #: The policy's options, declared once (``fairbatching.config``): what its constructor reads.
    config_type: ClassVar[type[PolicyConfig]] = PolicyConfig
    #: How much of a first token's lead over its TTFT deadline a backend carries into decode deadlines
    #: (``Request.slack_carry``); only deadline-aware policies care.
    slack_carry: float = 1.0
    #: Grace before decode deadlines bind, in units of the request's TPOT (``Request.decode_grace``).
    decode_grace: float = 0.0
    #: Promise that with nothing waiting and every running request decoding, ``schedule`` runs all of
    #: them (within its sequence and token limits). Lets a simulator replay such stretches without asking
    #: each iteration; a test holds every policy that sets it to the promise.
    schedules_all_decodes_when_idle: bool = True

    def __init__(
        self, cost_model: BatchPricer, config: PolicyConfig, max_num_batched_tokens: int, max_num_seqs: int
    ) -> None:
        """``config``: the checked options the policy was built from; the limits: what it derived from them."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config
        self.cost_model = cost_model
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs

    @abstractmethod
    def schedule(self, state: SchedulerState) -> BatchPlan: ...

    def observe_step(
        self, new_tokens: int, context_tokens: int, num_seqs: int, attn_work: float, seconds: float
    ) -> bool:
        """An executed step and what it took, from the backend's step loop; returns True when the planning
        model changed. Only an ``AdaptiveCostModel`` learns from it; policies that derive limits from the
        model (Sarathi's token budget) re-derive them then."""
        cost = self.cost_model
        if isinstance(cost, AdaptiveCostModel):
            return cost.observe(new_tokens, context_tokens, num_seqs, attn_work, seconds)
        return False

    def observe_decode_steps(self, num_seqs: int, context: np.ndarray, seconds: np.ndarray) -> None:
        """A run of executed decode-only steps (``num_seqs`` sequences, context ``context[i]``, ``seconds[i]``
        each), as the simulator's fast-forward replays them; the same as ``observe_step`` on each in turn.
        A policy that re-derives limits on a change overrides ``observe_step`` and is fed step by step."""
        cost = self.cost_model
        if type(self).observe_step is not Policy.observe_step:
            for c, t in zip(context.tolist(), seconds.tolist(), strict=True):
                self.observe_step(num_seqs, c, num_seqs, c, t)
        elif isinstance(cost, AdaptiveCostModel):
            cost.observe_decodes(num_seqs, context, seconds)

    def admission_budget(self, state: SchedulerState, horizon: float) -> AdmissionBudget:
        """This node's Prefill Admission Budget (see ``policies.admission``), priced by this policy's model."""
        return prefill_admission_budget(state, self.cost_model, horizon, self.max_num_seqs)

    def builder(self, state: SchedulerState, token_budget: int | None = None) -> BatchBuilder:
        budget = self.max_num_batched_tokens if token_budget is None else token_budget
        return BatchBuilder(state, self.cost_model, budget, self.max_num_seqs)


def total_computed(requests: list[Request]) -> int:
    """The requests' ``num_computed``, summed (a decode's context is that plus its one new token)."""
    total = 0
    for r in requests:
        total += r.num_computed
    return total


def count_crossing(decodes: list[Request], block_size: int) -> int:
    """How many of ``decodes`` need a new KV block for their next token: their KV fills the blocks they hold."""
    count = 0
    for r in decodes:
        if r.num_computed >= r.num_blocks * block_size:
            count += 1
    return count


class BatchBuilder:
    """Accumulates a batch while tracking tokens, sequences, KV blocks and the predicted batch time.

    KV is reserved as items are added; when a running request needs a block and none is free, the newest
    running request not yet in the batch is preempted by recompute, as vLLM does.
    """

    __slots__ = (
        "state",
        "cost",
        "token_budget",
        "max_seqs",
        "block_size",
        "free_blocks",
        "plan",
        "_scheduled",
        "new_tokens",
        "context",
        "attn",
        "seqs",
        "_victims",
        "resident",
    )

    def __init__(self, state: SchedulerState, cost: BatchPricer, token_budget: int, max_seqs: int) -> None:
        self.state = state
        self.cost = cost
        self.token_budget = token_budget
        self.max_seqs = max_seqs
        self.block_size = state.kv.block_size
        self.free_blocks = state.kv.free_blocks
        self.plan = BatchPlan()
        self._scheduled: set[int] | None = None
        self.new_tokens = 0
        self.context = 0
        self.attn = 0.0
        self.seqs = 0
        self._victims: list[Request] | None = None
        self.resident = len(state.running)  # requests holding KV; max_seqs caps it, as vLLM caps running

    @property
    def tokens_left(self) -> int:
        return self.token_budget - self.new_tokens

    @property
    def full(self) -> bool:
        return self.seqs >= self.max_seqs or self.new_tokens >= self.token_budget

    def time(self) -> float:
        return self.cost.predict(self.new_tokens, self.context, self.seqs, self.attn)

    def time_with(self, request: Request, n: int) -> float:
        c = request.num_computed
        return self.cost.predict(
            self.new_tokens + n, self.context + c + n, self.seqs + 1, self.attn + n * (c + (n + 1) * 0.5)
        )

    def blocks_needed(self, request: Request, n: int) -> int:
        return self.state.kv.extra_blocks(request, n)

    def add(self, request: Request, n: int, preempt: bool = False, reserve: int = 0) -> bool:
        """Add ``n`` tokens of ``request`` if budgets and KV allow.

        ``preempt``: evict other running requests for KV if needed. ``reserve``: blocks that must stay
        free after this allocation (admission headroom for the running requests to keep growing).
        """
        if n <= 0 or self.seqs >= self.max_seqs or n > self.token_budget - self.new_tokens:
            return False
        if self.plan.preempted and request in self.plan.preempted:
            return False
        admitting = request.num_blocks == 0  # a waiting request joins the running set
        if admitting and self.resident >= self.max_seqs:
            return False
        need = self.blocks_needed(request, n)
        if reserve and need + reserve > self.free_blocks:
            return False
        while need > self.free_blocks:
            if not preempt:
                return False
            if not self._preempt_one(exclude=request):
                self._preempt_self(request)
                return False
        self.free_blocks -= need
        c = request.num_computed
        self.plan.requests.append(request)
        self.plan.chunks.append(n)
        if self._scheduled is not None:
            self._scheduled.add(id(request))
        self.new_tokens += n
        self.context += c + n
        self.attn += n * (c + (n + 1) * 0.5)
        self.seqs += 1
        if admitting:
            self.resident += 1
        if n == 1 and request.token_times:  # a one-token step past the first token: what engines count as a decode
            self.plan.num_decodes += 1
        return True

    def add_decodes(self, decodes: list[Request], fresh: bool = False, computed: int | None = None) -> int:
        """Add one token for each decode, in order, preempting for KV as needed; returns how many were added.

        ``fresh``: the caller guarantees none of ``decodes`` is in the batch yet (skips a membership pass).
        ``computed``: the sum of their ``num_computed``, when the caller has it (spares a pass).
        Fast path: when the sequence and token limits and the free blocks cover them all, they are added in
        one pass (a decode needs a new block only when its KV exactly fills the blocks it holds).
        """
        if fresh or not self.plan.requests:
            todo = decodes
        else:
            scheduled = self.scheduled_ids()
            todo = [r for r in decodes if id(r) not in scheduled]
        n = len(todo)
        if not n:
            return 0
        need = count_crossing(todo, self.block_size)
        if (
            need <= self.free_blocks
            and self.seqs + n <= self.max_seqs
            and self.new_tokens + n <= self.token_budget
            and not self.plan.preempted
        ):
            ctx = (total_computed(todo) if computed is None or todo is not decodes else computed) + n
            self.free_blocks -= need
            self.plan.requests.extend(todo)
            self.plan.chunks.extend([1] * n)
            self._scheduled = None
            self.new_tokens += n
            self.context += ctx
            self.attn += ctx
            self.seqs += n
            self.plan.num_decodes += n
            return n
        added = 0
        for r in todo:
            if not self.add(r, 1, preempt=True):
                break
            added += 1
        return added

    def scheduled_ids(self) -> set[int]:
        """Identities of the requests in the batch so far (built on demand: most plans never ask)."""
        if self._scheduled is None:
            self._scheduled = set(map(id, self.plan.requests))
        return self._scheduled

    def _preempt_one(self, exclude: Request) -> bool:
        if self._victims is None:
            scheduled = self.scheduled_ids()
            self._victims = [r for r in self.state.running if id(r) not in scheduled]
        while self._victims:
            victim = self._victims.pop()
            if victim is exclude or id(victim) in self.scheduled_ids() or victim in self.plan.preempted:
                continue
            self.plan.preempted.append(victim)
            self.free_blocks += self.state.kv.blocks_freed_by(victim)
            self.resident -= 1
            return True
        return False

    def _preempt_self(self, request: Request) -> None:
        """No one else left to evict: a running request that cannot grow gives its own KV back (as vLLM)."""
        if request.num_blocks and request not in self.plan.preempted:
            self.plan.preempted.append(request)
            self.free_blocks += self.state.kv.blocks_freed_by(request)
            self.resident -= 1

    def largest_chunk(self, request: Request, limit: int, time_budget: float) -> int:
        """Largest ``n <= limit`` whose addition keeps the batch within ``time_budget`` (0 if none).

        The time grows with ``n`` (past a one-token chunk, a step of one kind), so the fitting sizes are a
        prefix and any search that keeps ``time(lo) <= budget < time(hi)`` ends at the same ``n``. Time is
        close to linear in ``n``: a guess where the chord between the bounds crosses the budget, checked
        with its successor, usually ends the search in two prices; bisection takes over if it does not.
        """
        if limit <= 0:
            return 0
        t_lo = self.time_with(request, 1)
        if t_lo > time_budget:
            return 0
        t_hi = self.time_with(request, limit)
        if t_hi <= time_budget:
            return limit
        lo, hi = 1, limit
        for _ in range(2):
            if hi - lo <= 1:
                return lo
            guess = lo + int((time_budget - t_lo) * (hi - lo) / (t_hi - t_lo))
            guess = min(max(guess, lo + 1), hi - 1)
            t = self.time_with(request, guess)
            if t > time_budget:
                hi, t_hi = guess, t
                continue
            lo, t_lo = guess, t
            if guess + 1 == hi:
                return lo
            t = self.time_with(request, guess + 1)
            if t > time_budget:
                return lo
            lo, t_lo = guess + 1, t
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.time_with(request, mid) <= time_budget:
                lo = mid
            else:
                hi = mid
        return lo

    def finish(self) -> BatchPlan:
        plan = self.plan
        plan.new_tokens, plan.context_tokens, plan.attn_work = self.new_tokens, self.context, self.attn
        plan.predicted_time = self.time()
        return plan
