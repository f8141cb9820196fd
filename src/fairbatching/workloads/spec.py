"""A workload is a list of request specs sorted by arrival, plus where it came from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fairbatching.core.kv import segment_block_hashes
from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RequestSpec:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    slo: SLO | None = None
    # What the request's tokens are, as content segments (id, tokens): equal ids at equal offsets are equal
    # tokens, so requests that share a prefix share KV blocks under prefix caching (empty: nothing shared).
    prefix: tuple[tuple[int, int], ...] = ()

    def block_hashes(self, block_size: int) -> tuple[int, ...]:
        """Chained hashes of the full blocks its segments cover, prompt and output (see ``core.kv``)."""
        if not self.prefix:
            return ()
        return segment_block_hashes(self.prefix, self.prompt_len + self.output_len, block_size)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[RequestSpec, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = {r.request_id for r in self.requests}
        if len(ids) != len(self.requests):
            raise ConfigError(f"workload {self.name!r}: request ids must be unique")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0

    @property
    def qps(self) -> float:
        return (len(self) - 1) / self.duration if self.duration > 0 else float("inf")

    def head(self, n: int, start: int = 0) -> Workload:
        """``n`` consecutive requests from ``start``, arrivals shifted to begin at 0."""
        if n < 1 or start < 0:
            raise ConfigError(f"workload {self.name!r}: need n >= 1 requests from start >= 0, got {n} from {start}")
        part = self.requests[start : start + n]
        if not part:
            raise ConfigError(f"workload {self.name!r} has {len(self)} requests; slice [{start}:{start + n}] is empty")
        t0 = part[0].arrival
        return Workload(self.name, tuple(replace(r, arrival=r.arrival - t0) for r in part), dict(self.meta))

    def rescaled(self, qps: float) -> Workload:
        """Same requests and burst pattern, arrival times stretched so the mean rate is ``qps``."""
        if not (qps > 0 and math.isfinite(qps)):
            raise ConfigError(f"target QPS must be positive and finite, got {qps}")
        if len(self) < 2:
            return self
        if self.duration <= 0:
            raise ConfigError(
                f"workload {self.name!r}: all {len(self)} requests arrive at the same time, so there is no rate "
                f"to rescale to {qps:g} req/s"
            )
        factor = self.qps / qps
        t0 = self.requests[0].arrival
        reqs = tuple(replace(r, arrival=(r.arrival - t0) * factor) for r in self.requests)
        return Workload(self.name, reqs, {**self.meta, "qps": qps})

    def stats(self) -> dict[str, float]:
        prompts = np.array([r.prompt_len for r in self.requests])
        outputs = np.array([r.output_len for r in self.requests])
        return {
            "requests": len(self),
            "duration_s": self.duration,
            "qps": self.qps,
            "prompt_mean": float(prompts.mean()),
            "prompt_p50": float(np.median(prompts)),
            "output_mean": float(outputs.mean()),
            "output_p50": float(np.median(outputs)),
        }
