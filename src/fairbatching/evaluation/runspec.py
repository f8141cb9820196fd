"""One simulation as a pure, hashable configuration, so sweeps can cache and distribute it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.evaluation.families import family
from fairbatching.experiment import Experiment

# Bump when simulator or metric semantics change, so stale cache entries are never reused.
RESULT_VERSION = 2


def _key(payload: dict[str, Any], profile: str | None, workload: str) -> str:
    """The spec plus what its inputs hold: a profile remeasured under the same name (or the default
    changing), or a trace edited in place, must not reuse results simulated with the old numbers."""
    payload = {
        **payload,
        "profile_content": _profile_fingerprint(profile),
        "workload_content": family(workload).fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@cache
def _profile_fingerprint(profile: str | None) -> str:
    p = load_profile(profile)
    content = {"params": asdict(p.params), "kv": asdict(p.kv)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    policy: str
    workload: str
    qps: float
    seed: int = 0
    num_requests: int = 2000
    ttft_slo: float = 2.0
    tpot_slo: float = 0.1
    profile: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def key(self) -> str:
        return _key({"v": RESULT_VERSION, **asdict(self)}, self.profile, self.workload)


@dataclass(frozen=True)
class ClusterRunSpec:
    """A cluster run: ``nodes`` copies of ``policy`` behind ``router``; ``qps`` is the whole cluster's rate."""

    policy: str
    router: str
    workload: str
    qps: float
    seed: int = 0
    nodes: int = 4
    num_requests: int = 4000
    ttft_slo: float = 2.0
    tpot_slo: float = 0.1
    admission: str = "none"
    report_interval: float = 0.5
    report_delay: float = 0.0
    profile: str | None = None

    def key(self) -> str:
        return _key({"v": RESULT_VERSION, "cluster": asdict(self)}, self.profile, self.workload)

    @property
    def label(self) -> str:
        return f"{self.policy}+{self.router}" + (f"+{self.admission}" if self.admission != "none" else "")


def run_spec(spec: RunSpec | ClusterRunSpec) -> dict[str, Any]:
    """Run one spec; returns the summary (no per-request rows) plus the spec itself."""
    if isinstance(spec, ClusterRunSpec):
        return _run_cluster(spec)
    w = family(spec.workload).build(spec.qps, spec.seed, spec.num_requests)
    exp = Experiment(
        w,
        load_profile(spec.profile),
        SLO(spec.ttft_slo, spec.tpot_slo),
        policy_options={spec.policy: dict(spec.options)},
    )
    summary = exp.run(spec.policy).summary.to_dict()
    # Normalised through JSON so a fresh result is identical to the same result read back from the cache.
    return json.loads(json.dumps({"spec": asdict(spec), "key": spec.key(), "summary": summary}))


def _run_cluster(spec: ClusterRunSpec) -> dict[str, Any]:
    from fairbatching.cluster import ClusterConfig, simulate_cluster
    from fairbatching.cluster.simulator import homogeneous
    from fairbatching.metrics.summary import summarize

    w = family(spec.workload).build(spec.qps, spec.seed, spec.num_requests)
    cfg = ClusterConfig(
        homogeneous(spec.nodes, spec.policy, spec.profile),
        SLO(spec.ttft_slo, spec.tpot_slo),
        router=spec.router,
        admission=spec.admission,
        report_interval=spec.report_interval,
        report_delay=spec.report_delay,
        seed=spec.seed,
    )
    res = simulate_cluster(w, cfg)
    if len(res.requests) != len(w):
        raise RuntimeError(f"cluster accounted for {len(res.requests)} of {len(w)} requests")
    summary = summarize(spec.label, w.name, res.requests, res.end_time, res.busy_time / spec.nodes, res.preemptions)
    return json.loads(json.dumps({"spec": asdict(spec), "key": spec.key(), "summary": summary.to_dict()}))
