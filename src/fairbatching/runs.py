"""The run layer: what to run (``RunSpec``, or an ``Experiment`` over a workload already in memory) and what
came out (``RunResult``). Every caller (CLI, sweeps, capacity search, evaluation, benchmarks) runs through
here, so workload -> policy -> node or cluster -> summary is wired once.

A ``RunSpec`` is pure and hashable: its ``key()`` hashes the spec plus the content of the profiles and the
trace it names, so a disk cache of results never serves numbers simulated from older inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from fairbatching.config import DEFAULT_QPS
from fairbatching.core.modes import DEFAULT_SLO, Admission, parse_mode
from fairbatching.core.request import SLO, Request
from fairbatching.costmodel.profile import Profile, check_slo_feasible, load_profile
from fairbatching.errors import ConfigError
from fairbatching.metrics.summary import Summary, summarize
from fairbatching.policies import make_policy
from fairbatching.serving.node import IterationLog
from fairbatching.serving.pricing import StepError, pricing_model
from fairbatching.serving.simulator import NodeConfig, simulate
from fairbatching.validate import check_policy_options
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload
from fairbatching.workloads.synthetic import default_workload
from fairbatching.workloads.traces import load_trace

# Bump when simulator or metric semantics (or the spec's fields) change, so stale cache entries are never reused.
RESULT_VERSION = 4

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build a workload: a trace file (optionally sliced and rescaled) or the embedded default."""

    trace: str | None = None
    fmt: str = "auto"
    num_requests: int | None = None
    start: int = 0
    qps: float | None = None
    seed: int = 0

    def build(self) -> Workload:
        if self.trace is None:
            n = 2000 if self.num_requests is None else self.num_requests
            return default_workload(n, DEFAULT_QPS if self.qps is None else self.qps, self.seed)
        limit = None if self.num_requests is None else self.start + self.num_requests
        w = load_trace(self.trace, self.fmt, limit=limit)
        if self.num_requests is not None or self.start:
            w = w.head(max(len(w) - self.start, 1) if self.num_requests is None else self.num_requests, self.start)
        return w.rescaled(self.qps) if self.qps is not None else w


@dataclass(frozen=True)
class ClusterShape:
    """``nodes`` copies of the spec's policy behind ``router``, reporting every ``report_interval`` seconds."""

    nodes: int = 4
    router: str = "pab"
    report_interval: float = 0.5
    report_delay: float = 0.0


@dataclass(frozen=True)
class RunSpec:
    """One run as a pure, hashable configuration, so sweeps can cache and distribute it.

    ``workload`` is a family name or a trace path; ``qps`` is the whole cluster's rate for a cluster run.
    ``profile`` is what the policies plan with; ``pricing`` (default: the same) is what the steps cost."""

    policy: str
    workload: str
    qps: float
    seed: int = 0
    num_requests: int = 2000
    ttft_slo: float = DEFAULT_SLO.ttft
    tpot_slo: float = DEFAULT_SLO.tpot
    profile: str | None = None
    pricing: str | None = None
    admission: Admission = Admission.NONE
    options: tuple[tuple[str, Any], ...] = ()
    cluster: ClusterShape | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission, "admission"))
        if self.cluster is not None and (self.pricing is not None or self.options):
            raise ConfigError("a cluster run plans and prices with its nodes' profile and default policy options")

    @property
    def slo(self) -> SLO:
        return SLO(self.ttft_slo, self.tpot_slo)

    @property
    def label(self) -> str:
        """The policy, and for a cluster the router and any admission control: ``fairbatching+pab+reject``."""
        if self.cluster is None:
            return self.policy
        return f"{self.policy}+{self.cluster.router}" + (f"+{self.admission}" if self.admission != "none" else "")

    def key(self) -> str:
        """The spec plus what its inputs hold: a profile remeasured under the same name (or the default
        changing), or a trace edited in place, must not reuse results simulated with the old numbers."""
        payload = {
            "v": RESULT_VERSION,
            **asdict(self),
            "profile_content": _profile_fingerprint(self.profile),
            "pricing_content": None if self.pricing is None else _profile_fingerprint(self.pricing),
            "workload_content": family(self.workload).fingerprint(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@cache
def _profile_fingerprint(profile: str | None) -> str:
    p = load_profile(profile)
    content = {"params": asdict(p.params), "kv": asdict(p.kv)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunResult:
    """A run's summary, with its step log and requests when it ran in this process (not from a cache)."""

    spec: RunSpec | None  # None for an Experiment's in-memory workload, which no spec rebuilds
    summary: Summary
    log: IterationLog | None = None
    requests: list[Request] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The cacheable part: spec, key and summary (no per-request rows), as plain JSON values."""
        if self.spec is None:
            raise ValueError("only a spec's result is cached")
        entry = {"spec": asdict(self.spec), "key": self.spec.key(), "summary": self.summary.to_dict()}
        return json.loads(json.dumps(entry))  # tuples become lists, modes their names: as read back from disk

    @classmethod
    def from_json(cls, spec: RunSpec, entry: dict[str, Any]) -> RunResult:
        return cls(spec, Summary.from_dict(entry["summary"]))


def run(spec: RunSpec, progress: Progress | None = None) -> RunResult:
    """Run one spec on the simulator: a single node, or a cluster when ``spec.cluster`` is set."""
    w = family(spec.workload).build(spec.qps, spec.seed, spec.num_requests)
    if spec.cluster is not None:
        return _run_cluster(spec, w)
    exp = Experiment(
        w,
        load_profile(spec.profile),
        spec.slo,
        admission=spec.admission,
        policy_options={spec.policy: dict(spec.options)},
        pricing=None if spec.pricing is None else load_profile(spec.pricing),
    )
    result = exp.run(spec.policy, progress)
    result.spec = spec
    return result


def run_for_cache(spec: RunSpec) -> dict[str, Any]:
    """``run(spec).to_json()``: what crosses a process (or Ray) boundary and what the disk cache holds."""
    return run(spec).to_json()


def _run_cluster(spec: RunSpec, w: Workload) -> RunResult:
    from fairbatching.cluster import ClusterConfig, simulate_cluster
    from fairbatching.cluster.simulator import homogeneous

    shape = spec.cluster
    assert shape is not None
    cfg = ClusterConfig(
        homogeneous(shape.nodes, spec.policy, spec.profile),
        spec.slo,
        router=shape.router,
        admission=spec.admission,
        report_interval=shape.report_interval,
        report_delay=shape.report_delay,
        seed=spec.seed,
    )
    res = simulate_cluster(w, cfg)
    _check_accounted(len(res.requests), len(w), "cluster")
    summary = summarize(spec.label, w.name, res.requests, res.end_time, res.busy_time / shape.nodes, res.preemptions)
    return RunResult(spec, summary, None, res.requests)


def _check_accounted(got: int, submitted: int, where: str) -> None:
    if got != submitted:
        raise RuntimeError(f"{where} accounted for {got} of {submitted} requests")


@dataclass
class Experiment:
    """One workload already in memory, one profile, one SLO, run under one or more policies.

    ``profile`` is what the policies plan with; ``pricing`` (default: the same) is what steps cost, and
    ``step_error`` how executed steps depart from it, so planning under model error can be studied offline."""

    workload: Workload
    profile: Profile
    slo: SLO = DEFAULT_SLO
    max_model_len: int = 131072
    queue_timeout: float | None = None
    admission: Admission = Admission.NONE
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pricing: Profile | None = None
    step_error: StepError | None = None

    def __post_init__(self) -> None:
        check_slo_feasible(self.slo, self.profile)
        self.admission = parse_mode(Admission, self.admission, "admission")
        if self.queue_timeout is not None and not (math.isfinite(self.queue_timeout) and self.queue_timeout > 0):
            raise ConfigError(f"queue timeout must be a positive number of seconds, got {self.queue_timeout!r}")
        cost = self.profile.cost_model()
        for name, options in self.policy_options.items():  # bad options fail now, not halfway through a run
            check_policy_options(name, options, "policy option")
            try:
                make_policy(name, cost, tpot_slo=self.slo.tpot, **options)
            except ValueError as exc:  # a constraint between options that no single range expresses
                raise ConfigError(f"policy options {name} {options}: {exc}") from None

    @property
    def title(self) -> str:
        w = self.workload
        return f"{w.name} @ {w.qps:.2f} req/s, SLO {self.slo.ttft:g} s / {self.slo.tpot * 1e3:g} ms"

    def describe(self) -> dict[str, Any]:
        """The settings a report carries beside its numbers."""
        return {
            "workload": {"name": self.workload.name, **self.workload.stats(), **self.workload.meta},
            "profile": {"name": self.profile.name, "source": self.profile.source, "note": self.profile.note},
            "slo": asdict(self.slo),
            "kv_blocks": self.profile.kv.num_blocks,
        }

    def run(self, policy: str, progress: Progress | None = None) -> RunResult:
        cost = self.profile.cost_model()
        pol = make_policy(policy, cost, tpot_slo=self.slo.tpot, **self.policy_options.get(policy, {}))
        priced = self.pricing or self.profile
        cfg = NodeConfig(
            default_slo=self.slo,
            kv=priced.kv,
            max_model_len=self.max_model_len,
            queue_timeout=self.queue_timeout,
            admission=self.admission,
        )
        res = simulate(pol, pricing_model(priced.cost_model(), self.step_error), self.workload, cfg, progress)
        _check_accounted(len(res.requests), len(self.workload), "simulator")
        summary = summarize(policy, self.workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
        return RunResult(None, summary, res.log, res.requests)
