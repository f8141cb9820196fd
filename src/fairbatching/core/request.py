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
from typing import Any

from mypy_extensions import mypyc_attr

from fairbatching.errors import ConfigError


def decode_anchor(first_deadline: float, first_token_time: float, slack_carry: float, grace: float = 0.0) -> float:
    """Where the decode envelope starts: token k (k >= 2) is due at ``anchor + (k - 1) * TPOT``.

    The paper's envelope anchors at ``arrival + TTFT`` (``slack_carry = 1``): a request whose first token
    came early keeps that lead as decode slack. ``slack_carry`` scales how much of the lead is kept (0 means
    decode deadlines run from the first token, which bounds the request's mean TPOT). A first token that
    came late re-anchors at its own time: the TTFT is lost, but the request can still meet its TPOT, and an
    envelope already in the past would make it urgent forever and starve every prefill. ``grace`` (seconds)
    lets the first decode tokens run late by that much: the SLO is on the mean TPOT, which a decode running
    faster than its TPOT afterwards wins back within a few tokens.
    """
    return first_token_time + slack_carry * max(0.0, first_deadline - first_token_time) + grace


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
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
    FAILED = "failed"


class Request:
    """Mutable scheduling state of one request, shared by policies and the backend that runs them."""

    __slots__ = (
        "request_id",
        "arrival",
        "prompt_len",
        "slo",
        "tpot",
        "num_tokens",
        "num_computed",
        "num_blocks",
        "token_times",
        "first_deadline",
        "slack_carry",
        "decode_grace",
        "next_deadline",
        "first_scheduled",
        "num_preemptions",
        "status",
        "finish_reason",
        "block_hashes",
        "prefix_hit",
    )

    def __init__(
        self,
        request_id: str,
        arrival: float,
        prompt_len: int,
        slo: SLO,
        num_cached: int = 0,
        slack_carry: float = 1.0,
        decode_grace: float = 0.0,
        block_hashes: tuple[int, ...] = (),
    ) -> None:
        """``block_hashes``: chained hashes of the request's full KV blocks, known in advance (its prompt, and
        for a simulated conversation its output too); a prefix-caching node shares blocks by them."""
        if prompt_len <= 0:
            raise ConfigError(f"request {request_id}: prompt length must be positive, got {prompt_len}")
        if not 0 <= num_cached < prompt_len:
            raise ConfigError(f"request {request_id}: cached tokens must be in [0, prompt_len), got {num_cached}")
        self.request_id = request_id
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.slo = slo
        self.tpot = slo.tpot
        self.num_tokens = prompt_len
        self.num_computed = num_cached
        self.num_blocks = 0
        self.token_times: list[float] = []
        self.first_deadline = arrival + slo.ttft
        self.slack_carry = slack_carry
        self.decode_grace = decode_grace
        self.next_deadline = self.first_deadline
        self.first_scheduled: float | None = None
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.block_hashes = block_hashes
        self.prefix_hit = 0  # prompt tokens served from a prefix cache when first scheduled

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
        """Register a sampled token at time ``t`` and move the deadline to the next token.

        Decode deadlines run from an anchor fixed at the first token (see ``envelope.decode_anchor``).
        """
        times = self.token_times
        times.append(t)
        self.num_tokens += 1
        if len(times) == 1:
            self.next_deadline = (
                decode_anchor(self.first_deadline, t, self.slack_carry, self.decode_grace * self.tpot) + self.tpot
            )
        else:
            self.next_deadline += self.tpot

    def reset_for_recompute(self) -> None:
        """Preemption by recompute (vLLM's default): the KV is dropped, prompt and output are prefilled again."""
        self.num_computed = 0
        self.num_blocks = 0
        self.num_preemptions += 1
        self.status = RequestStatus.WAITING

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as constructor arguments plus the changing state: compiled (mypyc) classes have no default."""
        args = (
            self.request_id,
            self.arrival,
            self.prompt_len,
            self.slo,
            0,
            self.slack_carry,
            self.decode_grace,
            self.block_hashes,
        )
        return _unpickle_request, (args, {name: getattr(self, name) for name in _STATE})

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, arrival={self.arrival:.3f}, prompt={self.prompt_len}, "
            f"computed={self.num_computed}/{self.num_tokens}, generated={self.num_generated})"
        )


_STATE = (
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
    "prefix_hit",
)


def _unpickle_request(args: tuple[Any, ...], state: dict[str, Any]) -> Request:
    r = Request(*args)
    for name, value in state.items():
        setattr(r, name, value)
    return r
