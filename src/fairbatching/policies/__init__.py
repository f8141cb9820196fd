"""Batch-formation policies. Every backend (simulator, GPU engine, vLLM plugin, router) drives these objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fairbatching.config import POLICY_CONFIGS, PolicyConfig, options_of, policy_config
from fairbatching.costmodel.adaptive import AdaptiveCostModel
from fairbatching.costmodel.model import BatchPricer, CostModel
from fairbatching.policies.base import BatchBuilder, Policy, SchedulerState
from fairbatching.policies.decode_first import PrefillFirstPolicy, SarathiPolicy, VLLMPolicy, budget_for_tpot
from fairbatching.policies.fairbatching import FairBatchingPolicy

_CLASSES: dict[type[PolicyConfig], type[Policy]] = {
    cls.config_type: cls for cls in (FairBatchingPolicy, SarathiPolicy, VLLMPolicy, PrefillFirstPolicy)
}
#: Every policy class by name, in the order of ``config.POLICY_CONFIGS`` (where the names are declared).
POLICIES: dict[str, type[Policy]] = {name: _CLASSES[config] for name, config in POLICY_CONFIGS.items()}


def make_policy(
    name: str,
    cost_model: BatchPricer,
    tpot_slo: float | None = None,
    calibrate: bool = True,
    defaults: Mapping[str, Any] | None = None,
    **options: Any,
) -> Policy:
    """Build a policy by name, with ``options`` (checked against its config, ``fairbatching.config``).

    ``tpot_slo`` and ``defaults`` are what the serving side knows (the run's TPOT SLO; an engine's
    ``max_num_seqs``, ...): each fills the option of that name where the policy declares one and ``options``
    leaves it unset (so Sarathi sizes its token budget from the TPOT SLO unless given ``token_budget``).

    ``calibrate``: plan on an ``AdaptiveCostModel`` over ``cost_model`` (a profile's ``CostModel``) that
    learns from the executed steps the backend feeds back (``Policy.observe_step``); where steps cost
    exactly what the model says, its plans are the model's own.
    """
    policy_config(name)  # refuses an unknown name
    cls = POLICIES[name]
    if calibrate and isinstance(cost_model, CostModel):
        cost_model = AdaptiveCostModel(cost_model)
    declared = options_of(cls.config_type)
    known = {"tpot_slo": tpot_slo, **(defaults or {})}
    filled = {k: v for k, v in known.items() if v is not None and k in declared and k not in options}
    return cls(cost_model, **filled, **options)


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
