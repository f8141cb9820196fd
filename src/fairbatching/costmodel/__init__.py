"""Batch cost model: predicts one iteration's time from its composition, fitted on measured rows.

The fitting (``costmodel.fit``, scipy) loads on first use of its names, so running on a profile does not load it."""

from typing import Any

from fairbatching.costmodel.model import BatchFeatures, CostModel, CostParams
from fairbatching.costmodel.profile import Profile, analytic_profile, available_profiles, load_profile
from fairbatching.costmodel.roofline import H100_SXM, LLAMA3_8B, HardwareSpec, ModelShape

_FIT = ("FitReport", "fit_cost_model", "load_profile_rows")


def __getattr__(name: str) -> Any:
    if name in _FIT:
        from fairbatching.costmodel import fit

        return getattr(fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FitReport",
    "fit_cost_model",
    "load_profile_rows",
    "H100_SXM",
    "LLAMA3_8B",
    "BatchFeatures",
    "CostModel",
    "CostParams",
    "HardwareSpec",
    "ModelShape",
    "Profile",
    "analytic_profile",
    "available_profiles",
    "load_profile",
]
