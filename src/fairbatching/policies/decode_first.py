"""Decode-first (stall-free) baselines: vLLM V1's default scheduler and Sarathi-Serve."""

from __future__ import annotations

from typing import Any, ClassVar

from fairbatching.config import PolicyConfig, PrefillFirstConfig, SarathiConfig, VLLMConfig
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import Request
from fairbatching.costmodel.model import BatchPricer, attn_work
from fairbatching.errors import ConfigError
from fairbatching.policies.base import Policy, SchedulerState


class VLLMPolicy(Policy):
    """vLLM V1: running requests first in queue order (preempting the newest for KV), then FCFS waiting
    prefills, chunked to fit ``max_num_batched_tokens``. No new request is admitted in a step that preempts."""

    name = VLLMConfig.policy
    config_type: ClassVar[type[PolicyConfig]] = VLLMConfig  # typed as the base's: Sarathi's differs

    def __init__(self, cost_model: BatchPricer, config: VLLMConfig | None = None, **options: Any) -> None:
        """``config`` (default: the declared defaults) with ``options`` by name on top (see ``config.py``)."""
        cfg = VLLMConfig.resolve(config, options)
        super().__init__(cost_model, cfg, cfg.max_num_batched_tokens, cfg.max_num_seqs)

    def token_budget(self) -> int:
        return self.max_num_batched_tokens

    def running_order(self, running: list[Request]) -> list[Request]:
        return running

    def schedule(self, state: SchedulerState) -> BatchPlan:
        b = self.builder(state, self.token_budget())
        running = self.running_order(state.running)
        lead = _leading_decodes(running)
        if lead and b.add_decodes(running[:lead], fresh=True) < lead:
            lead = len(running)  # ran out of budget or KV inside the decodes: nothing else fits
        for r in running[lead:]:
            if b.full:
                break
            if not b.add(r, min(r.num_tokens - r.num_computed, b.tokens_left), preempt=True):
                break
        if not b.plan.preempted:
            for r in state.waiting:
                if b.full or not b.add(r, min(r.num_tokens - r.num_computed, b.tokens_left)):
                    break
        return b.finish()


def _leading_decodes(running: list[Request]) -> int:
    """How many requests at the head of ``running`` are decodes (they can be added in bulk)."""
    for i, r in enumerate(running):
        # Not ``r.is_decode``, inlined: a property call per running request per step costs more than the test.
        if r.num_tokens - r.num_computed != 1 or not r.token_times:
            return i
    return len(running)


class SarathiPolicy(VLLMPolicy):
    """Sarathi-Serve stall-free batching: every running decode, then ongoing and new prefills (FCFS) in
    chunks up to a fixed token budget chosen so that a typical mixed batch meets the TPOT SLO."""

    name = SarathiConfig.policy
    config_type = SarathiConfig

    def __init__(self, cost_model: BatchPricer, config: SarathiConfig | None = None, **options: Any) -> None:
        """``config`` (default: the declared defaults) with ``options`` by name on top (see ``config.py``)."""
        cfg = SarathiConfig.resolve(config, options)
        token_budget, tpot_slo = cfg.token_budget, cfg.tpot_slo
        #: The TPOT the budget was derived from (None when given explicitly): re-derived as the model calibrates.
        self.derived_from_tpot = tpot_slo if token_budget is None else None
        if token_budget is None:
            if tpot_slo is None:
                raise ConfigError("sarathi needs a token budget or a TPOT SLO to derive one from")
            token_budget = budget_for_tpot(cost_model, tpot_slo)
        Policy.__init__(self, cost_model, cfg, token_budget, cfg.max_num_seqs)  # not VLLMPolicy's: no token cap option

    def observe_step(
        self, new_tokens: int, context_tokens: int, num_seqs: int, attn_work: float, seconds: float
    ) -> bool:
        """Sarathi sizes its chunks from profiled step times: when the calibrated model moves, so does the budget
        (never below the smallest mixed batch: that is as far as a token budget can shrink)."""
        changed = super().observe_step(new_tokens, context_tokens, num_seqs, attn_work, seconds)
        if changed and self.derived_from_tpot is not None:
            self.max_num_batched_tokens = budget_for_tpot(self.cost_model, self.derived_from_tpot, strict=False)
        return changed

    def running_order(self, running: list[Request]) -> list[Request]:
        if _leading_decodes(running) == len(running):
            return running
        # ``Request.is_decode``, inlined: a property call per running request per step costs more than the test.
        decodes = [r for r in running if r.num_tokens - r.num_computed == 1 and r.token_times]
        return decodes + [r for r in running if not (r.num_tokens - r.num_computed == 1 and r.token_times)]


def budget_for_tpot(
    cost_model: BatchPricer,
    tpot_slo: float,
    ref_decodes: int = 32,
    ref_context: int = 1024,
    granularity: int = 64,
    strict: bool = True,
) -> int:
    """Largest token budget (a multiple of ``granularity``) whose reference batch fits in ``tpot_slo``.

    ``strict``: refuse a TPOT no budget meets (configuration time); else fall back to the smallest budget.

    The reference batch is ``ref_decodes`` decodes at ``ref_context`` tokens of context plus one prefill
    chunk filling the rest of the budget, as Sarathi-Serve sizes its chunks from profiled iteration times.
    """

    def batch_time(budget: int) -> float:
        chunk = budget - ref_decodes
        return cost_model.predict(
            budget,
            ref_decodes * (ref_context + 1) + chunk,
            ref_decodes + 1,
            ref_decodes * attn_work(1, ref_context) + attn_work(chunk, 0),
        )

    floor = ref_decodes + granularity
    if batch_time(floor) > tpot_slo and not strict:
        return floor
    if batch_time(floor) > tpot_slo:
        raise ConfigError(
            f"TPOT SLO {tpot_slo * 1e3:.1f} ms is below the predicted time of a minimal mixed batch "
            f"({batch_time(floor) * 1e3:.1f} ms): no token budget can meet it on this profile"
        )
    lo, hi = floor, floor
    while batch_time(hi) <= tpot_slo and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        lo, hi = (mid, hi) if batch_time(mid) <= tpot_slo else (lo, mid)
    return lo


class PrefillFirstPolicy(Policy):
    """Orca / vLLM v0: whole prompts first, FCFS, in prefill-only batches; decodes run only when no
    prompt is admitted. The first prompt is admitted even when longer than the token budget."""

    name = PrefillFirstConfig.policy
    config_type = PrefillFirstConfig

    def __init__(self, cost_model: BatchPricer, config: PrefillFirstConfig | None = None, **options: Any) -> None:
        """``config`` (default: the declared defaults) with ``options`` by name on top (see ``config.py``)."""
        cfg = PrefillFirstConfig.resolve(config, options)
        super().__init__(cost_model, cfg, cfg.max_num_batched_tokens, cfg.max_num_seqs)

    def schedule(self, state: SchedulerState) -> BatchPlan:
        if state.waiting:
            head = state.waiting[0].num_tokens - state.waiting[0].num_computed
            b = self.builder(state, max(self.max_num_batched_tokens, head))
            for r in state.waiting:
                if not b.add(r, r.num_tokens - r.num_computed):
                    break
            if b.seqs:
                return b.finish()
        b = self.builder(state)
        b.add_decodes(state.running, fresh=True)
        return b.finish()
