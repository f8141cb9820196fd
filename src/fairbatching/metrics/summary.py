"""Per-request metrics and their aggregate.

TTFT is first token minus arrival; TPOT is the mean gap between a request's output tokens after the
first; TBT is every individual gap. A request meets its SLO when TTFT <= its TTFT target and TPOT <= its
TPOT target; one that was rejected or timed out meets neither. "Envelope" attainment is stricter: every
token by its envelope deadline.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from fairbatching.core.envelope import emission_slack
from fairbatching.core.request import Request, RequestStatus

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    request_id: str
    status: str
    reason: str
    arrival: float
    prompt_len: int
    output_len: int
    ttft: float
    tpot: float
    e2e: float
    queue_delay: float
    max_tbt: float
    preemptions: int
    ttft_slo: float
    tpot_slo: float
    ttft_met: bool
    tpot_met: bool
    envelope_met: bool

    @property
    def slo_met(self) -> bool:
        return self.ttft_met and self.tpot_met

    @property
    def served(self) -> bool:
        """Finished: a request that got a token and then failed or was refused is not served, and the TTFT
        figures leave it out."""
        return self.status == RequestStatus.FINISHED.value


def request_metrics(r: Request) -> RequestMetrics:
    times = r.token_times
    n = len(times)
    nan = math.nan
    ttft = times[0] - r.arrival if n else nan
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0 if n == 1 else nan
    max_tbt = max(b - a for a, b in zip(times, times[1:], strict=False)) if n > 1 else 0.0 if n else nan
    finished = r.status is RequestStatus.FINISHED
    # 1e-9 absorbs float noise in clock arithmetic; SLOs are in seconds, far above it.
    envelope = finished and all(ahead >= -1e-9 for ahead in emission_slack(r))
    return RequestMetrics(
        request_id=r.request_id,
        status=r.status.value,
        reason=r.finish_reason or "",
        arrival=r.arrival,
        prompt_len=r.prompt_len,
        output_len=n,
        ttft=ttft,
        tpot=tpot,
        e2e=times[-1] - r.arrival if n else nan,
        queue_delay=(r.first_scheduled - r.arrival) if r.first_scheduled is not None else nan,
        max_tbt=max_tbt,
        preemptions=r.num_preemptions,
        ttft_slo=r.slo.ttft,
        tpot_slo=r.slo.tpot,
        ttft_met=finished and ttft <= r.slo.ttft + 1e-9,
        tpot_met=finished and tpot <= r.slo.tpot + 1e-9,
        envelope_met=envelope,
    )


@dataclass(frozen=True, slots=True)
class Dist:
    """A latency distribution in seconds; NaN throughout when no request produced the value."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Dist:
        values = values[~np.isnan(values)]
        if not len(values):
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
        return cls(float(values.mean()), p50, p90, p99, float(values.max()))


@dataclass(frozen=True, slots=True)
class ClassSummary:
    """One SLO class of a mixed workload. Pooled over classes, P99 TTFT is the relaxed class's TTFT, which a
    deadline-ordered scheduler spends on purpose; a per-class tail is what a tiered SLO is judged by."""

    ttft_slo: float
    tpot_slo: float
    requests: int
    slo_attainment: float
    ttft: Dist

    @classmethod
    def from_dict(cls, d: dict) -> ClassSummary:
        return cls(**{**d, "ttft": Dist(**d["ttft"])})


def class_summaries(per: list[RequestMetrics]) -> list[ClassSummary] | None:
    """Per SLO class (tightest TTFT first) where requests carry more than one class, else None."""
    groups: dict[tuple[float, float], list[RequestMetrics]] = {}
    for m in per:
        groups.setdefault((m.ttft_slo, m.tpot_slo), []).append(m)
    if len(groups) < 2:
        return None
    return [
        ClassSummary(
            ttft_slo=ttft,
            tpot_slo=tpot,
            requests=len(ms),
            slo_attainment=sum(m.slo_met for m in ms) / len(ms),
            ttft=Dist.of(np.array([m.ttft for m in ms if m.served], dtype=float)),
        )
        for (ttft, tpot), ms in sorted(groups.items())
    ]


@dataclass
class Summary:
    policy: str
    workload: str
    requests: int
    finished: int
    rejected: int
    timed_out: int
    duration_s: float
    ttft: Dist
    tpot: Dist
    tbt: Dist
    e2e: Dist
    queue_delay: Dist
    ttft_attainment: float
    tpot_attainment: float
    slo_attainment: float
    envelope_attainment: float
    goodput_rps: float
    throughput_tok_s: float
    gpu_busy: float
    preemptions: int
    per_request: list[RequestMetrics] = field(default_factory=list)
    # With prefix caching: the share of scheduled requests' prompt tokens served from the cache (None: off,
    # and then absent from the JSON, so results without caching read as before).
    prefix_hit_rate: float | None = None
    # With more than one SLO class among the requests: each class's attainment and TTFT (None otherwise, and
    # then absent from the JSON).
    classes: list[ClassSummary] | None = None
    # Requests lost with a node that failed (a cluster with failures; 0, and then absent from the JSON, otherwise).
    failed: int = 0

    def to_dict(self, with_requests: bool = False) -> dict:
        d = {
            f.name: _plain(getattr(self, f.name))
            for f in fields(self)
            if f.name != "per_request" and not (f.name in OPTIONAL and getattr(self, f.name) == OPTIONAL[f.name])
        }
        if with_requests:
            d["per_request"] = [asdict(m) for m in self.per_request]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        """The inverse of ``to_dict()`` (without per-request rows): how a cached summary comes back."""
        values = {f.name: Dist(**d[f.name]) if f.name in DISTS else d[f.name] for f in fields(cls) if f.name in d}
        if values.get("classes") is not None:
            values["classes"] = [ClassSummary.from_dict(c) for c in values["classes"]]
        return cls(**values)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")

    def write_requests_csv(self, path: str | Path) -> None:
        names = [f.name for f in fields(RequestMetrics)]
        with Path(path).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for m in self.per_request:
                w.writerow([getattr(m, n) for n in names])


DISTS = ("ttft", "tpot", "tbt", "e2e", "queue_delay")
# Left out of the JSON where they hold these values, so results without them read as before.
OPTIONAL = {"prefix_hit_rate": None, "classes": None, "failed": 0}


def _plain(value: object) -> object:
    if isinstance(value, list):
        return [asdict(v) for v in value]
    return asdict(value) if isinstance(value, Dist) else value


def summarize(
    policy: str,
    workload: str,
    requests: list[Request],
    end_time: float,
    busy_time: float,
    preemptions: int,
    prefix_caching: bool = False,
) -> Summary:
    per = [request_metrics(r) for r in requests]
    n = len(per)
    start = min((r.arrival for r in requests), default=0.0)
    duration = max(end_time - start, 1e-12)
    col = {k: np.array([getattr(m, k) for m in per], dtype=float) for k in ("tpot", "e2e", "queue_delay")}
    col["ttft"] = np.array([m.ttft for m in per if m.served], dtype=float)
    gaps = [np.diff(r.token_times) for r in requests if len(r.token_times) > 1]
    tbt = np.concatenate(gaps) if gaps else np.array([])
    good = sum(m.slo_met for m in per)
    share = (lambda k: sum(getattr(m, k) for m in per) / n) if n else (lambda k: math.nan)
    return Summary(
        policy=policy,
        workload=workload,
        requests=n,
        finished=sum(m.status == RequestStatus.FINISHED.value for m in per),
        rejected=sum(m.status == RequestStatus.REJECTED.value for m in per),
        timed_out=sum(m.status == RequestStatus.TIMED_OUT.value for m in per),
        failed=sum(m.status == RequestStatus.FAILED.value for m in per),
        duration_s=duration,
        ttft=Dist.of(col["ttft"]),
        tpot=Dist.of(col["tpot"]),
        tbt=Dist.of(tbt),
        e2e=Dist.of(col["e2e"]),
        queue_delay=Dist.of(col["queue_delay"]),
        ttft_attainment=share("ttft_met"),
        tpot_attainment=share("tpot_met"),
        slo_attainment=good / n if n else math.nan,
        envelope_attainment=share("envelope_met"),
        goodput_rps=good / duration,
        throughput_tok_s=sum(m.output_len for m in per) / duration,
        gpu_busy=min(1.0, busy_time / duration),
        preemptions=preemptions,
        per_request=per,
        prefix_hit_rate=prefix_hit_rate(requests) if prefix_caching else None,
        classes=class_summaries(per),
    )


def prefix_hit_rate(requests: list[Request]) -> float:
    """Prompt tokens served from a prefix cache over the prompt tokens of the requests that were scheduled."""
    scheduled = [r for r in requests if r.first_scheduled is not None]
    total = sum(r.prompt_len for r in scheduled)
    return sum(r.prefix_hit for r in scheduled) / total if total else 0.0
