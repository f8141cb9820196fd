"""Batch cost model: predicts one iteration's time from its composition, fitted on measured rows."""

from fairbatching.costmodel.fit import FitReport, fit_cost_model, load_profile_rows
from fairbatching.costmodel.model import BatchFeatures, CostModel, CostParams
from fairbatching.costmodel.profile import Profile, available_profiles, load_profile
from fairbatching.costmodel.roofline import H100_SXM, LLAMA3_8B, HardwareSpec, ModelShape, analytic_profile

__all__ = [
    "H100_SXM",
    "LLAMA3_8B",
    "BatchFeatures",
    "CostModel",
    "CostParams",
    "FitReport",
    "HardwareSpec",
    "ModelShape",
    "Profile",
    "analytic_profile",
    "available_profiles",
    "fit_cost_model",
    "load_profile",
    "load_profile_rows",
]
