"""Batch cost model: predicts one iteration's time from its composition, fitted on measured rows.

The fitting (``costmodel.fit``, scipy) is imported where it is used, so running on a profile does not load it."""

from fairbatching.costmodel.model import BatchFeatures, CostModel, CostParams
from fairbatching.costmodel.profile import Profile, available_profiles, load_profile
from fairbatching.costmodel.roofline import H100_SXM, LLAMA3_8B, HardwareSpec, ModelShape, analytic_profile

__all__ = [
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
