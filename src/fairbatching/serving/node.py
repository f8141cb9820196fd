"""One serving node, steppable: the single-node simulator and the cluster simulator both drive it.

Each step the policy plans a batch over the node's state, the cost model prices it, the clock advances
by that time, and every sequence whose chunk completes its pending tokens emits one token. Requests
submitted meanwhile join the queue before the next plan. Every request ends finished, rejected (it can
never fit) or timed out (waited past ``queue_timeout`` for its first token), with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from mypy_extensions import mypyc_attr

from fairbatching.core.kv import BlockAllocator, KVCacheConfig, PrefixCachingAllocator
from fairbatching.core.modes import Admission, parse_mode
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.model import BatchPricer, CostModel
from fairbatching.errors import ConfigError
from fairbatching.policies.admission import AdmissionBudget
from fairbatching.policies.base import Policy, SchedulerState

FINISHED = RequestStatus.FINISHED
WAITING = RequestStatus.WAITING
ProgressFn = Callable[[int, int], None]
Executor = Callable[[BatchPlan, float], float]
"""Runs a plan that starts at clock ``t`` and returns the clock when its tokens are out. The simulator's
executor prices the plan with the cost model; the GPU engine's runs it and reads the wall clock."""


# How admission control's refusals begin (the reasons a refused request carries): over the prefill budget at
# arrival (or when deferred), and lost, its first token's deadline passed while it waited.
REFUSED_OVER_BUDGET = "admission control: prefill budget"
REFUSED_LOST = "admission control: its TTFT deadline passed before its turn"


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True)
class NodeConfig:
    default_slo: SLO
    kv: KVCacheConfig
    max_model_len: int = 131072
    queue_timeout: float | None = None
    record_iterations: bool = True
    fast_forward: bool = True
    # FairBatching-PAB on the node: a request whose prompt does not fit the node's Prefill Admission Budget
    # (horizon: its own TTFT) is rejected, or deferred until it fits or can no longer make its TTFT.
    admission: Admission = Admission.NONE
    # Automatic prefix caching (``core.kv.PrefixCachingAllocator``): a request's prefill starts after the
    # longest prefix of its blocks this node still has cached.
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission, "admission"))
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.queue_timeout is not None and self.queue_timeout <= 0:
            raise ConfigError(f"queue_timeout must be positive, got {self.queue_timeout}")


@dataclass
class IterationLog:
    """Per-iteration columns, for latency-over-time plots and utilisation."""

    start: list[float] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    decode_seqs: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_used: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Stretch:
    """A decode-only stretch in progress: iterations left, and the context of the next one.

    It outlives ``advance_to``'s horizon, so a cluster's report ticks (every node advanced to the tick)
    continue it instead of asking the policy for the same all-decode plan again.
    """

    left: int
    ctx: int


class Node:
    """A node's scheduler state and clock. ``submit`` requests, ``advance_to`` a time; ``done`` collects ends."""

    def __init__(
        self,
        policy: Policy,
        cost_model: BatchPricer,
        config: NodeConfig,
        name: str = "node",
        executor: Executor | None = None,
    ) -> None:
        self.policy = policy
        self.cost = cost_model
        self.config = config
        self.name = name
        self.kv = PrefixCachingAllocator(config.kv) if config.prefix_caching else BlockAllocator(config.kv)
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.done: list[Request] = []
        self.deferred: list[Request] = []
        self.targets: dict[str, int] = {}
        self.log = IterationLog()
        self.clock = 0.0
        self.busy = 0.0
        self.iterations = 0
        self.preemptions = 0
        self.state = SchedulerState(0.0, self.running, self.waiting, self.kv)
        self.executor = executor or self._predict
        # Fast-forward prices decode stretches without running them: only for the simulator's own executor.
        self._fast = executor is None and config.fast_forward and policy.schedules_all_decodes_when_idle
        self._stretch: _Stretch | None = None
        self.on_finish: Callable[[Request], None] | None = None

    def new_request(
        self,
        request_id: str,
        arrival: float,
        prompt_len: int,
        slo: SLO | None,
        block_hashes: tuple[int, ...] = (),
    ) -> Request:
        """A request view carrying this node's policy's deadline settings (and its block hashes when this node
        caches prefixes)."""
        p = self.policy
        return Request(
            request_id,
            arrival,
            prompt_len,
            slo or self.config.default_slo,
            slack_carry=p.slack_carry,
            decode_grace=p.decode_grace,
            block_hashes=block_hashes if self.config.prefix_caching else (),
        )

    def submit(self, r: Request, output_len: int) -> None:
        """Queue ``r`` (the simulator alone knows ``output_len``), or reject it if it can never fit."""
        self._stretch = None  # the next iteration is the policy's to plan again
        self.targets[r.request_id] = output_len
        reason = self._admission_problem(r, output_len, self.kv)
        if reason:
            self._end(r, RequestStatus.REJECTED, reason)
            return
        self.kv.lookup(r)  # a cached prefix is not prefill work: every check below prices the rest
        if self.config.admission == "none":
            self.waiting.append(r)
            return
        budget = self._budget(r)
        if budget.fits(r.num_tokens - r.num_computed):
            self.waiting.append(r)
        elif self.config.admission == "defer" and self.has_work:
            self.deferred.append(r)
        else:
            self._end(r, RequestStatus.REJECTED, _refusal(budget, r))

    def _budget(self, r: Request) -> AdmissionBudget:
        self.state.now = self.clock
        return self.policy.admission_budget(self.state, r.slo.ttft)

    def _admit_deferred(self) -> None:
        """Deferred requests join the queue, in order, once they fit; one that can no longer make its TTFT,
        or does not fit even an idle node, is rejected with the reason."""
        still = []
        for r in self.deferred:
            budget = self._budget(r)
            left = r.first_deadline - self.clock  # what it waited is gone from its TTFT
            if left > 0 and r.num_tokens - r.num_computed <= budget.tokens_within(left):
                self.waiting.append(r)
            elif self.clock - r.arrival >= r.slo.ttft or not (self.running or self.waiting):
                self._end(r, RequestStatus.REJECTED, _refusal(budget, r) + " (deferred until it could no longer fit)")
            else:
                still.append(r)
        self.deferred = still

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.deferred)

    def advance_to(self, t: float) -> None:
        """Run iterations that start before ``t`` (the last may end after it), then idle until ``t``."""
        while self.has_work and self.clock < t:
            if not self.step(horizon=t):
                break
        if self.clock < t:
            self.clock = t

    def drain(self) -> None:
        """Run until nothing is left; whatever the policy can no longer schedule is rejected with a reason."""
        while self.has_work:
            if not self.step(horizon=math.inf):
                self._reject_stuck()

    def step(self, horizon: float) -> bool:
        """Plan and run one iteration at the current clock (or a decode-only stretch up to ``horizon``).

        Returns False when the policy cannot schedule anything and preempted nothing: only an arrival can
        change that.
        """
        self._admit_and_expire_queued()
        if not (self.waiting or self.running):
            return False  # nothing runnable: only an arrival can change that
        if self._resume_stretch(horizon):
            return True
        plan = self._plan()
        if plan.is_empty:
            return bool(plan.preempted)
        if self._start_stretch(plan, horizon):
            return True
        clock = self._execute(plan)
        self._emit_tokens(plan, clock)
        return True

    def _admit_and_expire_queued(self) -> None:
        """Deferred requests that fit now join the queue; queued ones waiting past ``queue_timeout`` end."""
        if self.deferred:
            self._admit_deferred()
        timeout = self.config.queue_timeout
        if timeout is not None and self.waiting:
            self._expire(timeout)
        if self.config.admission != "none" and (self.waiting or self.running):
            self._refuse_lost()

    def _refuse_lost(self) -> None:
        """Under admission control, a request still without its first token once that token's deadline has
        passed is refused, queued or mid-prefill: it can no longer meet its SLO, and kept it would wait behind
        every request that still can (``late_last``) for as long as the backlog lasts, the P99 TTFT tail. Its
        KV goes back to the requests that can still make it."""
        now = self.clock
        for queue, status in ((self.waiting, RequestStatus.WAITING), (self.running, RequestStatus.RUNNING)):
            lost = [r for r in queue if not r.token_times and r.first_deadline <= now]
            if lost:
                for r in lost:
                    self._end(r, RequestStatus.REJECTED, REFUSED_LOST)
                queue[:] = [r for r in queue if r.status is status]

    def _resume_stretch(self, horizon: float) -> bool:
        """Continue the decode-only stretch in progress, if any, while it is still the batch the policy planned
        when it began: no arrival (``submit`` ends a stretch), no finish, KV covered. Report ticks land here
        without a new plan. Deferred requests are re-checked every step, and one admitted just now makes this
        a new decision."""
        if self._stretch is None:
            return False
        if not (self.waiting or self.deferred):
            self._advance(*self._continue_stretch(horizon))
            return True
        self._stretch = None
        return False

    def _plan(self) -> BatchPlan:
        """The policy's plan at the current clock; the requests it preempts go back to the head of the queue."""
        self.state.now = self.clock
        plan = self.policy.schedule(self.state)
        self.preemptions += self._apply_preemptions(plan, self.running, self.waiting, self.kv)
        return plan

    def _start_stretch(self, plan: BatchPlan, horizon: float) -> bool:
        """Replay ``plan`` as a decode-only stretch (``_fast_forward``) when it runs every running decode with
        nothing queued or deferred (a deferred request is re-checked every step): the policy would plan the same
        batch until something arrives or finishes."""
        running = self.running
        if self._fast and not (self.waiting or self.deferred) and plan.num_decodes == len(running) == plan.num_seqs:
            steps, elapsed = self._fast_forward(horizon)
            if steps:
                self._advance(steps, elapsed)
                return True
        return False

    def _execute(self, plan: BatchPlan) -> float:
        """Admit the plan's new requests, run it on the executor and account for the step (the policy hears
        what it took); returns the clock when its tokens are out."""
        running, waiting, kv = self.running, self.waiting, self.kv
        start = self.clock
        n_running, n_waiting = len(running), len(waiting)
        self._admit(plan, running, waiting, kv, start)
        clock = self.clock = self.executor(plan, start)
        dt = clock - start
        self.policy.observe_step(plan.new_tokens, plan.context_tokens, plan.num_seqs, plan.attn_work, dt)
        if self.config.record_iterations:
            _log_iteration(self.log, start, dt, plan, n_running, n_waiting, kv.used_blocks)
        self.busy += dt
        self.iterations += 1
        return clock

    def _emit_tokens(self, plan: BatchPlan, clock: float) -> None:
        """Each sequence whose chunk completes its pending tokens emits one at ``clock``; one that reaches its
        output length finishes and gives its KV back."""
        running, kv = self.running, self.kv
        finished = []
        targets = self.targets
        releases = self.state.releases  # the Prefill Admission Budget's slot release rate
        caching = kv.caching
        for r, n in zip(plan.requests, plan.chunks, strict=True):
            c = r.num_computed = r.num_computed + n
            if caching:
                kv.commit(r)
            if c == r.num_tokens:
                times = r.token_times
                if times:  # ``Request.record_token`` for a later token, inlined: once per decode per step
                    times.append(clock)
                    r.num_tokens = c + 1
                    r.next_deadline += r.tpot
                else:
                    r.record_token(clock)
                if len(times) >= targets[r.request_id]:  # tokens generated (num_tokens - prompt_len)
                    r.status = FINISHED
                    r.finish_reason = "length"
                    kv.free(r)
                    self.done.append(r)
                    finished.append(r)
                    releases.append(clock)
                    if self.on_finish is not None:
                        self.on_finish(r)
        for r in finished:
            running.remove(r)

    def _advance(self, steps: int, elapsed: float) -> None:
        self.clock += elapsed
        self.busy += elapsed
        self.iterations += steps

    def _predict(self, plan: BatchPlan, start: float) -> float:
        return start + self.cost.predict(plan.new_tokens, plan.context_tokens, plan.num_seqs, plan.attn_work)

    def _fast_forward(self, horizon: float) -> tuple[int, float]:
        """Start replaying decode-only iterations of all running requests in one go (see ``_Stretch``).

        Valid while nothing arrives, no request finishes, and the free KV blocks cover every block the
        decodes cross; the policy has promised (``schedules_all_decodes_when_idle``) that it would plan
        exactly this batch each time. Stops one token short of the first finish so that iteration, and
        every later decision, goes through the policy again. Returns (iterations, elapsed seconds).
        """
        running, kv = self.running, self.kv
        n = len(running)
        targets = self.targets
        steps = min([targets[r.request_id] - len(r.token_times) for r in running]) - 1
        steps = min(steps, (kv.free_blocks // n) * kv.block_size)  # a decode crosses <= 1 block per block_size
        if steps < 2:
            return 0, 0.0
        self._stretch = _Stretch(steps, sum([r.num_computed for r in running]) + n)
        return self._continue_stretch(horizon)

    def _continue_stretch(self, horizon: float) -> tuple[int, float]:
        """Run the pending stretch's iterations that start before ``horizon``; the rest stays pending."""
        stretch = self._stretch
        assert stretch is not None, "_continue_stretch without a stretch"
        running, kv = self.running, self.kv
        n = len(running)
        clock = self.clock
        ctx, durations, times = self._stretch_prices(n, stretch.ctx, stretch.left, clock, horizon)
        k = len(times)
        self.policy.observe_decode_steps(n, ctx, durations)
        stretch.left -= k
        stretch.ctx += k * n
        if not stretch.left:
            self._stretch = None
        # ``BlockAllocator.allocate`` inlined: ``_fast_forward`` sized the stretch so the free blocks cover it.
        bs = kv.block_size
        used = 0
        caching = kv.caching
        for r in running:
            c = r.num_computed = r.num_computed + k
            need = -(-c // bs) - r.num_blocks
            if need > 0:
                if caching:
                    kv.grow(r, need)
                else:
                    r.num_blocks += need
                    used += need
            if caching:
                kv.commit(r)
            r.num_tokens += k
            r.token_times.extend(times)
            r.next_deadline += k * r.tpot
        kv.free_blocks -= used
        if self.config.record_iterations:
            log = self.log
            log.start.extend([clock, *times[:-1]])
            log.duration.extend(durations.tolist())
            log.prefill_tokens.extend([0] * k)
            log.decode_seqs.extend([n] * k)
            log.running.extend([n] * k)
            log.waiting.extend([0] * k)
            log.kv_used.extend([kv.used_blocks] * k)
        return k, times[-1] - clock

    def _stretch_prices(
        self, n: int, ctx: int, left: int, clock: float, horizon: float
    ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Contexts, durations and end times of the next decode-only steps, up to ``left`` of them and the
        last one that starts before ``horizon`` (always at least one).

        A ``CostModel`` prices them as arrays: step i has context ``ctx + i * n`` and ends at the running sum
        of the durations from ``clock`` (``np.cumsum`` adds in order, as a step loop does, so the same bits).
        Every step costs at least the first, which bounds how many can start before ``horizon``. Any other
        pricer (a perturbed one draws noise per call) is asked step by step, exactly as often as needed.
        """
        cost = self.cost
        if isinstance(cost, CostModel):
            m = left
            if horizon != math.inf:
                m = min(m, int((horizon - clock) / cost.predict(n, ctx, n, ctx)) + 2)
            contexts = ctx + n * np.arange(m)
            durations = cost.predict_decodes(n, contexts)
            ends = np.cumsum(np.concatenate(([clock], durations)))
            k = max(1, int(np.searchsorted(ends[:-1], horizon)))  # steps that start before the horizon
            return contexts[:k], durations[:k], ends[1 : k + 1].tolist()
        durations_: list[float] = []
        times: list[float] = []
        t = clock
        for _ in range(left):
            if t >= horizon and times:
                break
            dt = cost.predict(n, ctx + n * len(times), n, ctx + n * len(times))
            durations_.append(dt)
            t += dt
            times.append(t)
        return ctx + n * np.arange(len(times)), np.array(durations_), times

    def _admission_problem(self, r: Request, output_len: int, kv: BlockAllocator) -> str | None:
        total_len = r.prompt_len + output_len
        if total_len > self.config.max_model_len:
            return f"prompt + output ({total_len} tokens) exceeds max_model_len {self.config.max_model_len}"
        if kv.blocks_for(total_len) > kv.num_blocks:
            return f"needs {kv.blocks_for(total_len)} KV blocks, the node has {kv.num_blocks}"
        return None

    @staticmethod
    def _apply_preemptions(plan: BatchPlan, running: list[Request], waiting: list[Request], kv: BlockAllocator) -> int:
        if not plan.preempted:
            return 0
        victims = set(map(id, plan.preempted))
        running[:] = [r for r in running if id(r) not in victims]
        for r in plan.preempted:
            kv.free(r)
            r.reset_for_recompute()
            kv.lookup(r)  # with prefix caching its own blocks, just released, are likely still cached
        waiting[:0] = plan.preempted[::-1]
        return len(plan.preempted)

    @staticmethod
    def _admit(plan: BatchPlan, running: list[Request], waiting: list[Request], kv: BlockAllocator, now: float) -> None:
        """Reserve the plan's KV and move newly scheduled requests from waiting to running."""
        bs = kv.block_size
        admitted = []
        caching = kv.caching
        for r, n in zip(plan.requests, plan.chunks, strict=True):
            held = r.num_blocks
            if caching and not held and r.status is WAITING:
                kv.admit(r)
            if r.num_computed + n > r.num_blocks * bs:
                kv.allocate(r, n)
            if not held and r.status is WAITING:
                r.status = RequestStatus.RUNNING
                if r.first_scheduled is None:
                    r.first_scheduled = now
                running.append(r)
                admitted.append(r)
        for r in admitted:  # admissions come from near the head of a queue that can be thousands long
            waiting.remove(r)

    def _expire(self, timeout: float) -> None:
        now = self.clock
        expired = [r for r in self.waiting if not r.token_times and now - r.arrival > timeout]
        if expired:
            for r in expired:
                self._end(r, RequestStatus.TIMED_OUT, f"waited over {timeout:g} s without a first token")
            self.waiting[:] = [r for r in self.waiting if r.status is RequestStatus.WAITING]

    def _reject_stuck(self) -> None:
        """The policy made no progress with no arrivals left: end the rest with a reason, never drop them."""
        for r in self.running + self.waiting:
            self._end(r, RequestStatus.REJECTED, "policy could not schedule it (KV or budget exhausted)")
        for r in self.deferred:
            self._end(r, RequestStatus.REJECTED, _refusal(self._budget(r), r) + " (deferred until the end)")
        self.running.clear()
        self.waiting.clear()
        self.deferred.clear()

    def _end(self, r: Request, status: RequestStatus, reason: str) -> None:
        self.kv.free(r)
        r.status = status
        r.finish_reason = reason
        self.done.append(r)
        if self.on_finish is not None:
            self.on_finish(r)


def _refusal(budget: AdmissionBudget, r: Request) -> str:
    uncached = r.num_tokens - r.num_computed  # a cached prefix is not prefill work
    cached = f" ({r.num_computed} cached)" if r.num_computed else ""
    tokens = budget.tokens_within(budget.horizon)
    return f"{REFUSED_OVER_BUDGET} {tokens} tokens < prompt {uncached}{cached}"


def _log_iteration(
    log: IterationLog, t: float, dt: float, plan: BatchPlan, running: int, waiting: int, kv: int
) -> None:
    decodes = plan.num_decodes
    log.start.append(t)
    log.duration.append(dt)
    log.prefill_tokens.append(plan.new_tokens - decodes)
    log.decode_seqs.append(decodes)
    log.running.append(running)
    log.waiting.append(waiting)
    log.kv_used.append(kv)
