"""The small view of a request that every backend (simulator, GPU engine, vLLM, router) fills in.

Token accounting follows vLLM: ``num_tokens`` is prompt + generated tokens, ``num_computed`` is how many of
them have KV in the cache (prefill progress, prefix-cache hits included). A step that brings
``num_computed`` up to ``num_tokens`` samples one new token. The output length is deliberately absent:
policies cannot see the future.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from fairbatching.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency targets in seconds: time to first token, and time per output token after it."""

    ttft: float
    tpot: float

    def __post_init__(self) -> None:
        for name, value in (("ttft", self.ttft), ("tpot", self.tpot)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"SLO {name} must be a positive finite number of seconds, got {value!r}")


class RequestStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"


class Request:
    """Mutable scheduling state of one request, shared by policies and the backend that runs them."""

    __slots__ = (
        "request_id",
        "arrival",
        "prompt_len",
        "slo",
        "num_tokens",
        "num_computed",
        "num_blocks",
        "token_times",
        "first_deadline",
        "next_deadline",
        "first_scheduled",
        "num_preemptions",
        "status",
        "finish_reason",
    )

    def __init__(self, request_id: str, arrival: float, prompt_len: int, slo: SLO, num_cached: int = 0) -> None:
        if prompt_len <= 0:
            raise ConfigError(f"request {request_id}: prompt length must be positive, got {prompt_len}")
        if not 0 <= num_cached < prompt_len:
            raise ConfigError(f"request {request_id}: cached tokens must be in [0, prompt_len), got {num_cached}")
        self.request_id = request_id
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.slo = slo
        self.num_tokens = prompt_len
        self.num_computed = num_cached
        self.num_blocks = 0
        self.token_times: list[float] = []
        self.first_deadline = arrival + slo.ttft
        self.next_deadline = self.first_deadline
        self.first_scheduled: float | None = None
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_times)

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token can be sampled (1 for a running decode)."""
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_computed == self.num_tokens - 1 and bool(self.token_times)

    def record_token(self, t: float) -> None:
        """Register a sampled token at time ``t`` and move the envelope deadline to the next token."""
        self.token_times.append(t)
        self.num_tokens += 1
        self.next_deadline = self.first_deadline + len(self.token_times) * self.slo.tpot

    def reset_for_recompute(self) -> None:
        """Preemption by recompute (vLLM's default): the KV is dropped, prompt and output are prefilled again."""
        self.num_computed = 0
        self.num_blocks = 0
        self.num_preemptions += 1
        self.status = RequestStatus.WAITING

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, arrival={self.arrival:.3f}, prompt={self.prompt_len}, "
            f"computed={self.num_computed}/{self.num_tokens}, generated={self.num_generated})"
        )
