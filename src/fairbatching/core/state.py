"""What a backend shows a policy each iteration: the seam's input (``core.plan.BatchPlan`` is its output)."""

from __future__ import annotations

from dataclasses import dataclass

from fairbatching.core.kv import BlockAllocator
from fairbatching.core.request import Request


@dataclass(slots=True)
class SchedulerState:
    """What a backend shows a policy: the clock, requests holding KV (admission order) and those waiting.

    ``running`` holds requests with KV allocated (decoding, or mid-prefill); ``waiting`` holds requests
    without KV, new or preempted, in queue order. Policies read this and return a plan; they never mutate it.
    """

    now: float
    running: list[Request]
    waiting: list[Request]
    kv: BlockAllocator
