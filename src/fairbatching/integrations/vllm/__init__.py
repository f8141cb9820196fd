"""FairBatching as vLLM's V1 scheduler: ``vllm serve MODEL --scheduler-cls
fairbatching.integrations.vllm.FairBatchingScheduler`` (``AsyncFairBatchingScheduler`` with async scheduling).

The classes load lazily, so the settings can be read (and tested) without vLLM installed; importing a
scheduler class checks the installed vLLM against the supported range.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_VLLM = ((0, 33), (0, 34))  # [lowest, first unsupported): the scheduler internals we steer
_SCHEDULERS = ("FairBatchingScheduler", "AsyncFairBatchingScheduler")


def __getattr__(name: str) -> Any:
    if name in _SCHEDULERS:
        from fairbatching.integrations.vllm import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_VLLM", *_SCHEDULERS]
