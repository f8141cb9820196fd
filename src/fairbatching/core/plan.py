"""A batch plan: what a policy asks the backend to run in one iteration."""

from __future__ import annotations

from dataclasses import dataclass, field

from fairbatching.core.request import Request


@dataclass(slots=True)
class BatchPlan:
    """Requests to preempt (by recompute) first, then ``requests[i]`` runs ``chunks[i]`` new tokens, in order.

    The aggregate shape (new tokens, context read, sequences, attention work) is what the cost model
    prices; ``predicted_time`` is the policy's own estimate of the batch duration. Two parallel lists
    rather than pairs: a plan carries every running decode each step, and the pairs cost an allocation each.
    """

    requests: list[Request] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    new_tokens: int = 0
    num_decodes: int = 0
    context_tokens: int = 0
    attn_work: float = 0.0
    predicted_time: float = 0.0

    @property
    def items(self) -> list[tuple[Request, int]]:
        """``(request, new tokens)`` in plan order."""
        return list(zip(self.requests, self.chunks, strict=True))

    @property
    def num_seqs(self) -> int:
        return len(self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def tokens_by_id(self) -> dict[str, int]:
        return {r.request_id: n for r, n in zip(self.requests, self.chunks, strict=True)}
