"""Batch-formation policies. Every backend (simulator, GPU engine, vLLM plugin, router) drives these objects."""

from __future__ import annotations

from typing import Any

from fairbatching.costmodel.adaptive import AdaptiveCostModel
from fairbatching.costmodel.model import BatchPricer, CostModel
from fairbatching.errors import ConfigError
from fairbatching.policies.base import BatchBuilder, Policy, SchedulerState
from fairbatching.policies.decode_first import PrefillFirstPolicy, SarathiPolicy, VLLMPolicy, budget_for_tpot
from fairbatching.policies.fairbatching import FairBatchingPolicy

POLICIES: dict[str, type[Policy]] = {
    "fairbatching": FairBatchingPolicy,
    "sarathi": SarathiPolicy,
    "vllm": VLLMPolicy,
    "prefill-first": PrefillFirstPolicy,
}


def make_policy(
    name: str, cost_model: BatchPricer, tpot_slo: float | None = None, calibrate: bool = True, **options: Any
) -> Policy:
    """Build a policy by name. ``tpot_slo`` sizes Sarathi's token budget unless ``token_budget`` is given.

    ``calibrate``: plan on an ``AdaptiveCostModel`` over ``cost_model`` (a profile's ``CostModel``) that
    learns from the executed steps the backend feeds back (``Policy.observe_step``); where steps cost
    exactly what the model says, its plans are the model's own.
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    if calibrate and isinstance(cost_model, CostModel):
        cost_model = AdaptiveCostModel(cost_model)
    if cls is SarathiPolicy:
        options.setdefault("tpot_slo", tpot_slo)
    try:
        return cls(cost_model, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for policy {name!r}: {exc}") from None


__all__ = [
    "POLICIES",
    "BatchBuilder",
    "FairBatchingPolicy",
    "Policy",
    "PrefillFirstPolicy",
    "SarathiPolicy",
    "SchedulerState",
    "VLLMPolicy",
    "budget_for_tpot",
    "make_policy",
]
