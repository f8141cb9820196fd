"""Engine-neutral policy core: request view, SLO envelopes, batch plans and KV-block accounting."""

from fairbatching.core.envelope import is_urgent, slack, token_deadline
from fairbatching.core.kv import BlockAllocator, KVCacheConfig
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import SLO, Request, RequestStatus

__all__ = [
    "SLO",
    "BatchPlan",
    "BlockAllocator",
    "KVCacheConfig",
    "Request",
    "RequestStatus",
    "is_urgent",
    "slack",
    "token_deadline",
]
