"""What a backend shows a policy each iteration: the seam's input (``core.plan.BatchPlan`` is its output)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fairbatching.core.kv import BlockAllocator
from fairbatching.core.request import Request

RELEASE_WINDOW = 32  # finishes the slot release rate is measured over


@dataclass(slots=True)
class SchedulerState:
    """What a backend shows a policy: the clock, requests holding KV (admission order) and those waiting.

    ``running`` holds requests with KV allocated (decoding, or mid-prefill); ``waiting`` holds requests
    without KV, new or preempted, in queue order. Policies read this and return a plan; they never mutate it.
    ``releases``: when the last running requests finished, oldest first, as the backend saw them: how soon a
    node whose sequence slots are all taken seats the next request (Prefill Admission Budget). A backend
    that does not record them leaves it empty, and a full node then has no room.
    """

    now: float
    running: list[Request]
    waiting: list[Request]
    kv: BlockAllocator
    releases: deque[float] = field(default_factory=lambda: deque(maxlen=RELEASE_WINDOW))
