"""Batch-formation policies. Every backend (simulator, GPU engine, vLLM plugin, router) drives these objects."""

from __future__ import annotations

from typing import Any

from fairbatching.costmodel.model import CostModel
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


def make_policy(name: str, cost_model: CostModel, tpot_slo: float | None = None, **options: Any) -> Policy:
    """Build a policy by name. ``tpot_slo`` sizes Sarathi's token budget unless ``token_budget`` is given."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
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
