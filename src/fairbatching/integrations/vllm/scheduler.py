"""The vLLM V1 scheduler driven by a fairbatching policy. All the code that touches vLLM internals is here.

Each step the policy plans a batch over engine-neutral request views (``core.Request``) built from vLLM's
running and waiting requests. The plan is then carried out by vLLM's own ``Scheduler.schedule()``, steered:
the requests the plan preempts are preempted first (vLLM's own preemption, by recompute); the running list
holds only the planned running requests, decodes before prefill chunks (vLLM gives each running request what it
asks for, in list order: so the decodes get their token, and the prefill chunks share what is left, the first
taking what it asks for), otherwise in plan order; the waiting
queue only the planned waiting ones, in plan order; and the token budget is the plan's token count plus the
planned decodes' draft tokens. vLLM therefore still does everything else exactly as usual: KV allocation,
prefix caching, structured output, spec decode, stop/abort handling and finished-request bookkeeping.
Running requests come before waiting ones in vLLM's loop, so a new prompt the plan puts ahead of one already
mid-prefill gets what the running chunk leaves. Unplanned requests go back to their lists afterwards, in their
original order. If the policy plans nothing
while vLLM has work (its KV accounting is coarser than vLLM's), the step falls back to vLLM's own decision,
and is counted.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import vllm
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request as VllmRequest
from vllm.v1.request import RequestStatus as VllmStatus

from fairbatching.core.kv import BlockAllocator, KVCacheConfig
from fairbatching.core.request import Request
from fairbatching.core.state import RELEASE_WINDOW
from fairbatching.costmodel.profile import fastest_decode_step
from fairbatching.errors import ConfigError
from fairbatching.integrations.vllm import SUPPORTED_VLLM
from fairbatching.integrations.vllm.settings import SchedulerSettings, request_slo
from fairbatching.policies.admission import AdmissionBudget
from fairbatching.policies.base import SchedulerState

logger = init_logger("vllm.fairbatching")  # through vLLM's handlers, format and level


def _check_version() -> None:
    parts = tuple(int(p) for p in vllm.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VLLM
    if not low <= parts < high:
        raise ConfigError(
            f"fairbatching's vLLM scheduler supports vLLM >= {'.'.join(map(str, low))}, < "
            f"{'.'.join(map(str, high))}; found {vllm.__version__}"
        )


_check_version()


class FairBatchingMixin:
    """Everything FairBatching adds to a vLLM scheduler class; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.fb_settings = SchedulerSettings.load(additional_config=self.vllm_config.additional_config)
            cost = self.fb_settings.load_profile().cost_model()
            self.fb_policy = self.fb_settings.make_policy(
                cost, self.max_num_running_reqs, self.max_num_scheduled_tokens
            )
            self.fb_floor = fastest_decode_step(cost)
            self._fb_gauges = self._start_exporter()
        except ConfigError as exc:  # vLLM prints the traceback; this is the line that says what to fix
            logger.error("%s", exc)
            raise
        pool = self.kv_cache_manager.block_pool
        self.fb_kv = BlockAllocator(KVCacheConfig(max(1, pool.num_gpu_blocks - 1), self.block_size))
        self.fb_views: dict[str, Request] = {}
        self.fb_releases: deque[float] = deque(maxlen=RELEASE_WINDOW)  # when requests left: the PAB's seat rate
        self.fb_fallbacks = 0
        self.fb_steps = 0
        self.fb_budget: AdmissionBudget | None = None
        self._fb_scheduled: dict[int, tuple[float, tuple[int, int, int, float]]] = {}
        self._fb_last_update = 0.0
        self._log_startup()

    def _start_exporter(self):
        s = self.fb_settings
        if s.metrics_port is None:
            return None
        from fairbatching.integrations.vllm.metrics import start_pab_exporter

        try:
            return start_pab_exporter(s.metrics_port, s.metrics_host)
        except OSError as exc:
            where = f"{s.where('metrics_host', s.metrics_host)}, {s.where('metrics_port', s.metrics_port)}"
            raise ConfigError(
                f"fairbatching scheduler: {where}: cannot serve the PAB metrics: {exc.strerror}"
            ) from None

    def _log_startup(self) -> None:
        """One line with what is running; a warning when the class does not match vLLM's scheduling loop."""
        is_async = bool(self.scheduler_config.async_scheduling)
        loop = "async" if is_async else "sync"
        logger.info("%s (%s scheduling): %s", type(self).__name__, loop, self.fb_settings.describe())
        if is_async != isinstance(self, AsyncScheduler):
            wanted = "AsyncFairBatchingScheduler" if is_async else "FairBatchingScheduler"
            logger.warning(
                "%s runs in vLLM's %s scheduling loop%s: use --scheduler-cls "
                "fairbatching.integrations.vllm.%s for this loop",
                type(self).__name__,
                loop,
                " (vLLM's default)" if is_async else "",
                wanted,
            )

    # -- request views -------------------------------------------------------------------------------

    def add_request(self, request: VllmRequest) -> None:
        super().add_request(request)
        if request.request_id in self.fb_views:  # a streaming session's next chunk: same request, same view
            return
        params = request.sampling_params
        slo, problem = request_slo(params.extra_args if params else None, self.fb_settings.default_slo, self.fb_floor)
        if problem:
            logger.warning("request %s: %s", request.request_id, problem)
        p = self.fb_policy
        view = Request(
            request.request_id,
            request.arrival_time,
            max(1, request.num_prompt_tokens),
            slo,
            slack_carry=p.slack_carry,
            decode_grace=p.decode_grace,
        )
        self.fb_views[request.request_id] = view

    def _views(self, requests) -> list[Request]:
        """Refresh and return the views of ``requests`` (the hot loop of every step: kept lean)."""
        views, bs, out = self.fb_views, self.block_size, []
        append = out.append
        for r in requests:
            v = views.get(r.request_id)
            if v is None:  # bypassed add_request (e.g. a resumed streaming session): default SLO
                v = views[r.request_id] = Request(
                    r.request_id, r.arrival_time, max(1, r.num_prompt_tokens), self.fb_settings.default_slo
                )
            n, c = r.num_tokens, r.num_computed_tokens
            v.num_tokens = n
            v.num_computed = c if c < n else n - 1
            v.num_blocks = -(-c // bs)
            append(v)
        return out

    def _policy_state(self) -> SchedulerState:
        running = self._views(self.running)
        waiting = (
            self._views(self.kv_holding_waiting) + self._views(self.waiting)
            if self.waiting or self.kv_holding_waiting
            else []
        )
        kv = self.fb_kv
        kv.free_blocks = min(kv.num_blocks, self.kv_cache_manager.block_pool.get_num_free_blocks())
        return SchedulerState(time.time(), running, waiting, kv, self.fb_releases)

    # -- scheduling ----------------------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any):
        self.fb_steps += 1
        state = self._policy_state()
        plan = self.fb_policy.schedule(state) if (state.running or state.waiting) else None
        if plan is None or plan.is_empty:
            if state.running or state.waiting:
                self.fb_fallbacks += 1
            output = super().schedule(*args, **kwargs)
        else:
            output = self._steered(plan, args, kwargs)
            if output.total_num_scheduled_tokens:  # priced as planned, for the policy's calibration
                features = (plan.new_tokens, plan.context_tokens, plan.num_seqs, plan.attn_work)
                self._fb_scheduled[id(output)] = (time.monotonic(), features)
        self._export_budget()
        return output

    def _steered(self, plan, args, kwargs):
        """Run vLLM's schedule() over exactly the planned requests, with the plan's budget, after preempting
        the plan's victims."""
        self._preempt(plan.preempted)
        chunks = plan.tokens_by_id()
        running, waiting, holding = self.running, self.waiting, self.kv_holding_waiting
        planned = [self.requests[rid] for rid in chunks if rid in self.requests]
        planned_running = [r for r in planned if r.status == VllmStatus.RUNNING]
        planned_running.sort(key=lambda r: chunks[r.request_id] > 1)  # decodes first, each in plan order
        hidden = [r for r in running if r.request_id not in chunks]
        self.running = planned_running
        in_holding = set(map(id, holding)) if holding else set()
        planned_queued = [r for r in planned if r.status != VllmStatus.RUNNING]
        self.waiting = self._queue([r for r in planned_queued if id(r) not in in_holding])
        self.kv_holding_waiting = self._queue([r for r in planned_queued if id(r) in in_holding])
        budget = self.max_num_scheduled_tokens
        drafts = sum(len(r.spec_token_ids) for r in planned_running if chunks[r.request_id] == 1)
        self.max_num_scheduled_tokens = min(budget, plan.new_tokens + drafts)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget
            self._restore(running, hidden, waiting, holding, planned_queued)

    def _preempt(self, victims: list[Request]) -> None:
        """Preempt the plan's victims as vLLM preempts (blocks freed, back to the front of the waiting queue,
        reported in this step's output); else vLLM would preempt a planned request to make the same room."""
        if not victims:
            return
        ids = {v.request_id for v in victims}
        now = time.monotonic()
        keep = []
        for r in self.running:  # blocks whose free is deferred (an async KV connector) would free nothing now
            if r.request_id in ids and r.status == VllmStatus.RUNNING and self._request_blocks_can_be_freed(r):
                self._preempt_request(r, now, drop_stale_output=self.requires_kv_delivery)
            else:
                keep.append(r)
        self.running = keep

    def _queue(self, requests: list[VllmRequest]):
        q = create_request_queue(self.policy)
        for r in requests:
            q.add_request(r)
        return q

    def _restore(self, running, hidden, waiting, holding, planned_queued) -> None:
        """Put back what the plan left out, and the running list in its original order; what vLLM moved stays
        where it put it: admitted requests joined running, preempted ones go to the front of the waiting queue."""
        was_running = set(map(id, running))
        still = set(map(id, self.running)) | set(map(id, hidden))
        admitted = [r for r in self.running if id(r) not in was_running]  # planned waiting requests vLLM admitted
        self.running = [r for r in running if id(r) in still] + admitted
        planned_ids = set(map(id, planned_queued))
        in_holding = set(map(id, holding))
        # planned, not admitted, and now in the other queue (e.g. an async KV load began): vLLM looks for it there
        switched = [
            r
            for r in planned_queued
            if r.status != VllmStatus.RUNNING and self._holds_kv_blocks(r) != (id(r) in in_holding)
        ]
        for original, scratch in ((waiting, self.waiting), (holding, self.kv_holding_waiting)):
            moved_in = [r for r in scratch if id(r) not in planned_ids]  # preempted during this step
            if admitted:
                original.remove_requests(admitted)
            if switched:
                original.remove_requests([r for r in switched if (id(r) in in_holding) == (original is holding)])
                moved_in += [r for r in switched if (id(r) in in_holding) != (original is holding)]
            if moved_in:
                original.prepend_requests(reversed(moved_in))  # FCFS prepends in reverse
        self.waiting, self.kv_holding_waiting = waiting, holding

    def update_from_output(self, scheduler_output, model_runner_output):
        now_mono, now = time.monotonic(), time.time()
        started = self._fb_scheduled.pop(id(scheduler_output), None)
        if started is not None:  # as every backend's step loop does; learns only with calibration online
            began, features = started
            self.fb_policy.observe_step(*features, now_mono - max(began, self._fb_last_update))
        self._fb_last_update = now_mono
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        views, live = self.fb_views, self.requests
        for rid, tokens in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids, strict=False):
            view = views.get(rid)
            if view is not None:
                for _ in tokens:
                    view.record_token(now)
                if rid not in live:  # finished in this step (stop, length)
                    del views[rid]
                    self.fb_releases.append(now)
        if self.fb_steps % 1024 == 0:  # requests vLLM ended elsewhere (e.g. ignored at admission)
            for rid in [rid for rid in views if rid not in live]:
                del views[rid]
        return outputs

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        now = time.time()
        for r in finished:
            if self.fb_views.pop(r.request_id, None) is not None:
                self.fb_releases.append(now)
        return finished

    # -- Prefill Admission Budget --------------------------------------------------------------------

    def admission_budget(self, horizon: float | None = None) -> AdmissionBudget:
        """This node's PAB over ``horizon`` seconds (default: the TTFT SLO), for a cluster router."""
        state = self._policy_state()
        return self.fb_policy.admission_budget(state, horizon or self.fb_settings.ttft_slo)

    def _export_budget(self) -> None:
        if self._fb_gauges is None:
            return
        self.fb_budget = self.admission_budget()
        self._fb_gauges.update(self.fb_budget, self.fb_steps, self.fb_fallbacks)


class FairBatchingScheduler(FairBatchingMixin, Scheduler):
    """vLLM's synchronous scheduler, batches formed by the fairbatching policy (FAIRBATCHING_POLICY)."""


class AsyncFairBatchingScheduler(FairBatchingMixin, AsyncScheduler):
    """The same on vLLM's async-scheduling scheduler (``--async-scheduling``)."""
