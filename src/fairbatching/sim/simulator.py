"""Single-node discrete-event simulator.

Each iteration the policy plans a batch over the node's state, the cost model prices it, the clock
advances by that time, and every sequence whose chunk completes its pending tokens emits one token.
Requests that arrive meanwhile join the queue before the next plan. Every request ends finished,
rejected (it can never fit) or timed out (waited past ``queue_timeout`` for its first token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fairbatching.core.kv import BlockAllocator, KVCacheConfig
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.model import CostModel
from fairbatching.errors import ConfigError
from fairbatching.policies.base import Policy, SchedulerState
from fairbatching.workloads.spec import Workload

ProgressFn = Callable[[int, int], None]
FINISHED = RequestStatus.FINISHED
WAITING = RequestStatus.WAITING


@dataclass(frozen=True)
class SimConfig:
    default_slo: SLO
    kv: KVCacheConfig
    max_model_len: int = 131072
    queue_timeout: float | None = None
    record_iterations: bool = True
    fast_forward: bool = True

    def __post_init__(self) -> None:
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


@dataclass
class SimResult:
    policy: str
    requests: list[Request]
    output_lens: dict[str, int]
    end_time: float
    busy_time: float
    iterations: int
    preemptions: int
    log: IterationLog
    kv_blocks: int


class Simulator:
    def __init__(self, policy: Policy, cost_model: CostModel, config: SimConfig) -> None:
        self.policy = policy
        self.cost = cost_model
        self.config = config

    def run(self, workload: Workload, progress: ProgressFn | None = None) -> SimResult:
        cfg = self.config
        kv = BlockAllocator(cfg.kv)
        carry, grace = self.policy.slack_carry, self.policy.decode_grace
        pending = [
            Request(
                s.request_id, s.arrival, s.prompt_len, s.slo or cfg.default_slo, slack_carry=carry, decode_grace=grace
            )
            for s in workload.requests
        ]
        targets = {s.request_id: s.output_len for s in workload.requests}
        pending.sort(key=lambda r: r.arrival)
        total = len(pending)
        running: list[Request] = []
        waiting: list[Request] = []
        done: list[Request] = []
        log = IterationLog()
        clock = pending[0].arrival if pending else 0.0
        busy = 0.0
        iterations = preemptions = 0
        nxt = 0
        state = SchedulerState(clock, running, waiting, kv)
        timeout = cfg.queue_timeout
        fast = cfg.fast_forward and self.policy.schedules_all_decodes_when_idle
        while nxt < total or waiting or running:
            if not waiting and not running and pending[nxt].arrival > clock:
                clock = pending[nxt].arrival
            while nxt < total and pending[nxt].arrival <= clock:
                r = pending[nxt]
                nxt += 1
                reason = self._admission_problem(r, targets[r.request_id], kv)
                if reason:
                    _end(r, RequestStatus.REJECTED, reason, kv, done)
                else:
                    waiting.append(r)
            if timeout is not None and waiting:
                self._expire(waiting, clock, timeout, kv, done)
            state.now = clock
            plan = self.policy.schedule(state)
            preemptions += self._apply_preemptions(plan, running, waiting, kv)
            if plan.is_empty:
                if plan.preempted:
                    continue
                if nxt < total:
                    clock = max(clock, pending[nxt].arrival)
                    continue
                self._reject_stuck(running, waiting, kv, done)
                break
            if fast and not waiting and plan.num_decodes == len(running) == plan.num_seqs > 1:
                horizon = pending[nxt].arrival if nxt < total else math.inf
                steps, elapsed = self._fast_forward(running, kv, targets, clock, horizon, log)
                if steps:
                    clock += elapsed
                    busy += elapsed
                    iterations += steps
                    continue
            dt = self.cost.predict(plan.new_tokens, plan.context_tokens, plan.num_seqs, plan.attn_work)
            if cfg.record_iterations:
                _log_iteration(log, clock, dt, plan, len(running), len(waiting), kv.used_blocks)
            self._admit(plan, running, waiting, kv, clock)
            clock += dt
            busy += dt
            iterations += 1
            finished = False
            for r, n in plan.items:
                r.num_computed += n
                if r.num_computed == r.num_tokens:
                    r.record_token(clock)
                    if r.num_tokens - r.prompt_len >= targets[r.request_id]:
                        r.status = FINISHED
                        r.finish_reason = "length"
                        kv.free(r)
                        done.append(r)
                        finished = True
            if finished:
                running[:] = [r for r in running if r.status is RequestStatus.RUNNING]
                if progress is not None:
                    progress(len(done), total)
        if progress is not None:
            progress(len(done), total)
        return SimResult(self.policy.name, done, targets, clock, busy, iterations, preemptions, log, cfg.kv.num_blocks)

    def _fast_forward(
        self,
        running: list[Request],
        kv: BlockAllocator,
        targets: dict[str, int],
        clock: float,
        horizon: float,
        log: IterationLog,
    ) -> tuple[int, float]:
        """Replay decode-only iterations of all ``running`` requests in one go.

        Valid while nothing arrives (``horizon``), no request finishes, and the free KV blocks cover every
        block the decodes cross; the policy has promised (``schedules_all_decodes_when_idle``) that it would
        plan exactly this batch each time. Stops one token short of the first finish so that iteration,
        and every later decision, goes through the policy again. Returns (iterations, elapsed seconds).
        """
        n = len(running)
        steps = min(targets[r.request_id] - len(r.token_times) for r in running) - 1
        steps = min(steps, (kv.free_blocks // n) * kv.block_size)  # a decode crosses <= 1 block per block_size
        if steps < 2:
            return 0, 0.0
        ctx = sum(r.num_computed for r in running) + n
        predict = self.cost.predict
        times: list[float] = []
        durations: list[float] = []
        t = clock
        for _ in range(steps):
            if t >= horizon and times:
                break
            dt = predict(n, ctx, n, ctx)
            durations.append(dt)
            t += dt
            times.append(t)
            ctx += n
        k = len(times)
        for r in running:
            kv.allocate(r, k)
            r.num_computed += k
            r.num_tokens += k
            r.token_times.extend(times)
            r.next_deadline += k * r.tpot
        if self.config.record_iterations:
            log.start.extend([clock, *times[:-1]])
            log.duration.extend(durations)
            log.prefill_tokens.extend([0] * k)
            log.decode_seqs.extend([n] * k)
            log.running.extend([n] * k)
            log.waiting.extend([0] * k)
            log.kv_used.extend([kv.used_blocks] * k)
        return k, t - clock

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
        waiting[:0] = plan.preempted[::-1]
        return len(plan.preempted)

    @staticmethod
    def _admit(plan: BatchPlan, running: list[Request], waiting: list[Request], kv: BlockAllocator, now: float) -> None:
        """Reserve the plan's KV and move newly scheduled requests from waiting to running."""
        bs = kv.block_size
        admitted = None
        for r, n in plan.items:
            held = r.num_blocks
            if r.num_computed + n > held * bs:
                kv.allocate(r, n)
            if not held and r.status is WAITING:
                r.status = RequestStatus.RUNNING
                if r.first_scheduled is None:
                    r.first_scheduled = now
                running.append(r)
                admitted = admitted or set()
                admitted.add(id(r))
        if admitted:
            waiting[:] = [r for r in waiting if id(r) not in admitted]

    @staticmethod
    def _expire(waiting: list[Request], now: float, timeout: float, kv: BlockAllocator, done: list[Request]) -> None:
        expired = [r for r in waiting if not r.token_times and now - r.arrival > timeout]
        if expired:
            for r in expired:
                _end(r, RequestStatus.TIMED_OUT, f"waited over {timeout:g} s without a first token", kv, done)
            waiting[:] = [r for r in waiting if r.status is RequestStatus.WAITING]

    @staticmethod
    def _reject_stuck(running: list[Request], waiting: list[Request], kv: BlockAllocator, done: list[Request]) -> None:
        """The policy made no progress with no arrivals left: end the rest with a reason, never drop them."""
        for r in running + waiting:
            _end(r, RequestStatus.REJECTED, "policy could not schedule it (KV or budget exhausted)", kv, done)
        running.clear()
        waiting.clear()


def _end(r: Request, status: RequestStatus, reason: str, kv: BlockAllocator, done: list[Request]) -> None:
    kv.free(r)
    r.status = status
    r.finish_reason = reason
    done.append(r)


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


def simulate(
    policy: Policy, cost_model: CostModel, workload: Workload, config: SimConfig, progress: ProgressFn | None = None
) -> SimResult:
    return Simulator(policy, cost_model, config).run(workload, progress)
