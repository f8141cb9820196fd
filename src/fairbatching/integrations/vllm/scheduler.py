"""The vLLM V1 scheduler driven by a fairbatching policy. All the code that touches vLLM internals is here.

Each step the policy plans a batch over engine-neutral request views (``core.Request``) built from vLLM's
running and waiting requests. The plan is then carried out by vLLM's own ``Scheduler.schedule()``, steered:
its running list holds only the planned running requests, in plan order; its waiting queue only the
planned waiting ones, in plan order; and its token budget is the plan's token count. vLLM therefore
still does everything else exactly as usual: KV allocation and preemption, prefix caching, structured
output, spec decode, stop/abort handling and finished-request bookkeeping. Unplanned requests go back to
their lists afterwards, in their original order. If the policy plans nothing while vLLM has work (its KV
accounting is coarser than vLLM's), the step falls back to vLLM's own decision, and is counted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request as VllmRequest
from vllm.v1.request import RequestStatus as VllmStatus

from fairbatching.core.kv import BlockAllocator, KVCacheConfig
from fairbatching.core.request import Request, RequestStatus
from fairbatching.costmodel.online import OnlineCalibrator
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.vllm import SUPPORTED_VLLM
from fairbatching.integrations.vllm.settings import SchedulerSettings, request_slo
from fairbatching.policies import make_policy
from fairbatching.policies.admission import AdmissionBudget
from fairbatching.policies.base import SchedulerState

logger = logging.getLogger("fairbatching.vllm")


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
        self.fb_settings = SchedulerSettings.load()
        prior = load_profile(self.fb_settings.profile).cost_model()
        self.fb_calibrator = OnlineCalibrator(prior) if self.fb_settings.calibration == "online" else None
        options = {
            "max_num_seqs": self.max_num_running_reqs,
            **(
                {}
                if self.fb_settings.policy == "sarathi"
                else {"max_num_batched_tokens": self.max_num_scheduled_tokens}
            ),
            **self.fb_settings.policy_options,
        }
        self.fb_policy = make_policy(self.fb_settings.policy, prior, tpot_slo=self.fb_settings.tpot_slo, **options)
        pool = self.kv_cache_manager.block_pool
        self.fb_kv = BlockAllocator(KVCacheConfig(max(1, pool.num_gpu_blocks - 1), self.block_size))
        self.fb_views: dict[str, Request] = {}
        self.fb_fallbacks = 0
        self.fb_steps = 0
        self.fb_budget: AdmissionBudget | None = None
        self._fb_scheduled: dict[int, tuple[float, tuple[int, int, int, float]]] = {}
        self._fb_last_update = 0.0
        self._fb_gauges = None
        if self.fb_settings.metrics_port is not None:
            from fairbatching.integrations.vllm.metrics import start_pab_exporter

            self._fb_gauges = start_pab_exporter(self.fb_settings.metrics_port)
        logger.info("fairbatching scheduler: %s", self.fb_settings)

    # -- request views -------------------------------------------------------------------------------

    def add_request(self, request: VllmRequest) -> None:
        super().add_request(request)
        params = request.sampling_params
        slo, problem = request_slo(params.extra_args if params else None, self.fb_settings.default_slo)
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

    def _view(self, request: VllmRequest, status: RequestStatus) -> Request:
        v = self.fb_views.get(request.request_id)
        if v is None:  # a request that bypassed add_request (e.g. a resumed session): default SLO
            v = Request(
                request.request_id,
                request.arrival_time,
                max(1, request.num_prompt_tokens),
                self.fb_settings.default_slo,
            )
            self.fb_views[request.request_id] = v
        v.num_tokens = request.num_tokens
        v.num_computed = min(request.num_computed_tokens, request.num_tokens - 1) if v.num_tokens else 0
        v.num_blocks = -(-v.num_computed // self.block_size)
        v.status = status
        return v

    def _policy_state(self) -> SchedulerState:
        running = [self._view(r, RequestStatus.RUNNING) for r in self.running]
        waiting = [self._view(r, RequestStatus.WAITING) for q in (self.kv_holding_waiting, self.waiting) for r in q]
        kv = self.fb_kv
        kv.free_blocks = min(kv.num_blocks, self.kv_cache_manager.block_pool.get_num_free_blocks())
        return SchedulerState(time.time(), running, waiting, kv)

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
        self._after_schedule(output)
        return output

    def _steered(self, plan, args, kwargs):
        order = {r.request_id: i for i, (r, _n) in enumerate(plan.items)}
        rank = order.__getitem__
        running, waiting, holding = list(self.running), list(self.waiting), list(self.kv_holding_waiting)
        planned_running = sorted((r for r in running if r.request_id in order), key=lambda r: rank(r.request_id))
        planned_waiting = sorted((r for r in waiting if r.request_id in order), key=lambda r: rank(r.request_id))
        planned_holding = [r for r in holding if r.request_id in order]
        budget = self.max_num_scheduled_tokens
        self.running = planned_running
        self.waiting, self.kv_holding_waiting = self._queue(planned_waiting), self._queue(planned_holding)
        self.max_num_scheduled_tokens = min(budget, plan.new_tokens)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget
            self._restore(running, waiting, holding)
        return output

    def _queue(self, requests: list[VllmRequest]):
        q = create_request_queue(self.policy)
        for r in requests:
            q.add_request(r)
        return q

    def _restore(self, running: list[VllmRequest], waiting: list[VllmRequest], holding: list[VllmRequest]) -> None:
        """Put unplanned requests back in their original order; what vLLM moved stays where it put it:
        planned requests it preempted went to the front of the waiting queue, admitted ones to running."""
        was_running = set(map(id, running))
        now_running = set(map(id, self.running))
        hidden = [r for r in running if id(r) not in now_running and r.status == VllmStatus.RUNNING]
        hidden_ids = set(map(id, hidden))
        self.running = [r for r in running if id(r) in now_running or id(r) in hidden_ids] + [
            r for r in self.running if id(r) not in was_running
        ]
        in_running = set(map(id, self.running))
        queued_before = set(map(id, waiting)) | set(map(id, holding))
        preempted = [r for r in self.waiting if id(r) not in queued_before]
        preempted_holding = [r for r in self.kv_holding_waiting if id(r) not in queued_before]
        self.waiting = self._queue(preempted + [r for r in waiting if id(r) not in in_running and _queued(r)])
        self.kv_holding_waiting = self._queue(
            preempted_holding + [r for r in holding if id(r) not in in_running and _queued(r)]
        )

    def _after_schedule(self, output) -> None:
        """Remember what this step runs, for online calibration, and refresh the PAB."""
        n_new = output.total_num_scheduled_tokens
        if n_new:
            seqs = len(output.num_scheduled_tokens)
            context, attn = 0, 0.0
            for rid, n in output.num_scheduled_tokens.items():
                r = self.requests.get(rid)
                computed = max(0, r.num_computed_tokens - n) if r is not None else 0
                context += computed + n
                attn += n * (computed + (n + 1) * 0.5)
            self._fb_scheduled[id(output)] = (time.monotonic(), (n_new, context, seqs, attn))
        self._export_budget()

    def update_from_output(self, scheduler_output, model_runner_output):
        now_mono, now = time.monotonic(), time.time()
        started = self._fb_scheduled.pop(id(scheduler_output), None)
        if started is not None and self.fb_calibrator is not None:
            began, features = started
            seconds = now_mono - max(began, self._fb_last_update)
            if self.fb_calibrator.observe(*features, seconds):
                self.fb_policy.cost_model = self.fb_calibrator.model
        self._fb_last_update = now_mono
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for rid, tokens in zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids, strict=False):
            view = self.fb_views.get(rid)
            if view is not None:
                for _ in tokens:
                    view.record_token(now)
        for rid in [rid for rid in self.fb_views if rid not in self.requests]:
            del self.fb_views[rid]
        return outputs

    def finish_requests(self, request_ids, finished_status):
        finished = super().finish_requests(request_ids, finished_status)
        for r in finished:
            self.fb_views.pop(r.request_id, None)
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


def _queued(r: VllmRequest) -> bool:
    return not VllmStatus.is_finished(r.status) and r.status != VllmStatus.RUNNING


class FairBatchingScheduler(FairBatchingMixin, Scheduler):
    """vLLM's synchronous scheduler, batches formed by the fairbatching policy (FAIRBATCHING_POLICY)."""


class AsyncFairBatchingScheduler(FairBatchingMixin, AsyncScheduler):
    """The same on vLLM's async-scheduling scheduler (``--async-scheduling``)."""
