"""The run layer: what to run (``RunSpec``, or an ``Experiment`` over a workload already in memory) and what
came out (``RunResult``). Every caller (CLI, sweeps, capacity search, evaluation, benchmarks) runs through
here, so workload -> policy -> node or cluster -> summary is wired once.

A ``RunSpec`` is pure and hashable: its ``key()`` hashes the spec plus the content of the profiles and the
trace it names, so a disk cache of results never serves numbers simulated from older inputs.

The backend is part of what to run: ``backend="sim"`` prices steps with the cost model; ``backend="gpu"``
replays the same workload, policy and profile in real time on GPU engines (``engine.cluster.EngineCluster``:
one engine per GPU, built and warmed once by the caller and reused for every run), and each GPU result
carries the simulator's prediction for the same run beside it (``RunResult.sim``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

from fairbatching.config import DEFAULT_QPS
from fairbatching.core.backend import Backend, EngineSpec
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
from fairbatching.workloads.families import family, generated_family
from fairbatching.workloads.spec import Workload
from fairbatching.workloads.synthetic import default_workload
from fairbatching.workloads.traces import load_trace

# Bump when simulator or metric semantics (or the spec's fields) change, so stale cache entries are never reused.
RESULT_VERSION = 5
MAX_MODEL_LEN = 131072  # the simulator's default context limit (a GPU run's is its engine's)

Progress = Callable[[int, int], None]
# Engines for the GPU backend: an ``engine.cluster.EngineCluster`` (typed loosely: importing it needs torch).
Engines = Any


@dataclass(frozen=True)
class WorkloadSpec:
    """How to build a workload: a trace file (optionally sliced and rescaled), a generated family (``generated``:
    ``mixed-slo``, ``multi-turn``), or the embedded default."""

    trace: str | None = None
    fmt: str = "auto"
    num_requests: int | None = None
    start: int = 0
    qps: float | None = None
    seed: int = 0
    generated: str | None = None

    def __post_init__(self) -> None:
        if self.trace is None and self.fmt != "auto":
            raise ConfigError(f"--format {self.fmt}: reads a --trace file, and none is given")
        if self.trace is None and self.start:
            what = f"the generated {self.generated!r}" if self.generated else "the embedded default"
            raise ConfigError(f"--start {self.start}: skips requests of a --trace, not of {what} workload")

    def build(self) -> Workload:
        if self.generated is not None or self.trace is None:
            n = 2000 if self.num_requests is None else self.num_requests
            qps = DEFAULT_QPS if self.qps is None else self.qps
            if self.generated is not None:
                return generated_family(self.generated).build(qps, self.seed, n)
            return default_workload(n, qps, self.seed)
        limit = None if self.num_requests is None else self.start + self.num_requests
        w = load_trace(self.trace, self.fmt, limit=limit)
        if limit is not None and len(w) < limit:  # a shorter window would be measured as the one asked for
            raise ConfigError(
                f"{self.trace} has {len(w)} requests: fewer than {self.num_requests} from request {self.start}"
            )
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
    ``profile`` is what the policies plan with; ``pricing`` (default: the same) is what the steps cost.
    ``backend`` is what runs the steps; ``engine`` is the GPU backend's engine (the simulator, given one,
    refuses requests longer than its context, as the engine does)."""

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
    backend: Backend = Backend.SIM
    engine: EngineSpec | None = None
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission, "admission"))
        object.__setattr__(self, "backend", parse_mode(Backend, self.backend, "backend"))
        if self.cluster is not None and (self.pricing is not None or self.options):
            raise ConfigError("a cluster run plans and prices with its nodes' profile and default policy options")
        if self.backend is Backend.GPU:
            if self.engine is None:
                raise ConfigError("a GPU run needs its engine (RunSpec.engine)")
            if self.pricing is not None:
                raise ConfigError("a GPU run's steps cost what the GPU takes: drop pricing")

    def simulated(self) -> RunSpec:
        """The same run on the simulator: what a GPU result is shown beside."""
        return replace(self, backend=Backend.SIM)

    @property
    def slo(self) -> SLO:
        return SLO(self.ttft_slo, self.tpot_slo)

    @property
    def label(self) -> str:
        """The policy, and for a cluster the router and any admission control: ``fairbatching+pab+reject``."""
        cache = "+prefix-cache" if self.prefix_caching else ""
        if self.cluster is None:
            return self.policy + cache
        admission = f"+{self.admission}" if self.admission != "none" else ""
        return f"{self.policy}+{self.cluster.router}{admission}{cache}"

    def as_dict(self) -> dict[str, Any]:
        """The spec's fields; ``prefix_caching`` only when on, so specs from before it keep their keys."""
        d = asdict(self)
        if not self.prefix_caching:
            del d["prefix_caching"]
        return d

    def key(self) -> str:
        """The spec plus what its inputs hold: a profile remeasured under the same name (or the default
        changing), or a trace edited in place, must not reuse results simulated with the old numbers."""
        spec = self.as_dict()
        if self.backend is Backend.SIM and self.engine is None:  # as before the backend existed: caches stay valid
            del spec["backend"], spec["engine"]
        payload = {
            "v": RESULT_VERSION,
            **self.as_dict(),
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
    """A run's summary, with its step log and requests when it ran in this process (not from a cache); a run on
    a real backend carries the simulator's summary of the same run (``sim``)."""

    spec: RunSpec | None  # None for an Experiment's in-memory workload, which no spec rebuilds
    summary: Summary
    log: IterationLog | None = None
    requests: list[Request] = field(default_factory=list)
    sim: Summary | None = None

    def to_json(self) -> dict[str, Any]:
        """The cacheable part: spec, key and summary (no per-request rows), as plain JSON values."""
        if self.spec is None:
            raise ValueError("only a spec's result is cached")
        entry = {"spec": self.spec.as_dict(), "key": self.spec.key(), "summary": self.summary.to_dict()}
        if self.sim is not None:
            entry["sim"] = self.sim.to_dict()
        return json.loads(json.dumps(entry))  # tuples become lists, modes their names: as read back from disk

    @classmethod
    def from_json(cls, spec: RunSpec, entry: dict[str, Any]) -> RunResult:
        sim = Summary.from_dict(entry["sim"]) if isinstance(entry.get("sim"), dict) else None
        return cls(spec, Summary.from_dict(entry["summary"]), sim=sim)


def run(spec: RunSpec, progress: Progress | None = None, engines: Engines = None) -> RunResult:
    """Run one spec: on the simulator (a single node, or a cluster when ``spec.cluster`` is set), or replayed
    on ``engines`` for the GPU backend."""
    if spec.backend is not Backend.SIM:
        return run_on_engines([spec], engines, None if progress is None else lambda _i, d, t: progress(d, t))[0]
    w = family(spec.workload).build(spec.qps, spec.seed, spec.num_requests)
    if spec.cluster is not None:
        return _run_cluster(spec, w)
    result = _experiment(spec, w).run(spec.policy, progress)
    result.spec = spec
    return result


def experiment(spec: RunSpec, engines: Engines = None) -> Experiment:
    """``spec``'s workload in memory, to run any policy on (replayed on ``engines`` for the GPU backend): what
    needs each run's requests and step log, which a ``RunResult`` read from the cache does not keep."""
    return _experiment(spec, family(spec.workload).build(spec.qps, spec.seed, spec.num_requests), engines)


def _experiment(spec: RunSpec, w: Workload, engines: Engines = None) -> Experiment:
    return Experiment(
        w,
        load_profile(spec.profile),
        spec.slo,
        max_model_len=spec.engine.max_context if spec.engine is not None else MAX_MODEL_LEN,
        admission=spec.admission,
        policy_options={spec.policy: dict(spec.options)},
        pricing=None if spec.pricing is None else load_profile(spec.pricing),
        engines=engines,
        prefix_caching=spec.prefix_caching,
    )


def run_on_engines(
    specs: list[RunSpec],
    engines: Engines,
    progress: Callable[[int, int, int], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """GPU specs replayed on ``engines``, each with the simulator's prediction beside it: single-node specs as
    many at once as there are engines, then cluster specs one at a time on all of them (one engine per node);
    ``progress(spec index, ended, total)``, ``on_result`` as each one ends."""
    if engines is None:
        raise ConfigError("a GPU run needs engines: start them (engine.cluster.EngineCluster) and pass them in")
    on_cluster = [i for i, s in enumerate(specs) if s.cluster is not None]
    if on_cluster:
        single = [i for i, s in enumerate(specs) if s.cluster is None]
        out = dict(zip(single, run_on_engines([specs[i] for i in single], engines, None, on_result), strict=True))
        for i in on_cluster:
            step = None if progress is None else functools.partial(progress, i)
            out[i] = _cluster_on_engines(specs[i], engines, step)
            if on_result is not None:
                on_result(out[i])
        return [out[i] for i in range(len(specs))]
    exps = [experiment(s, engines) for s in specs]
    jobs = [exp.replay_job(s.policy, s.seed) for exp, s in zip(exps, specs, strict=True)]
    done: dict[int, RunResult] = {}

    def landed(i: int, res: Any) -> None:
        done[i] = exps[i].engine_result(specs[i].policy, res)
        done[i].spec = specs[i]
        if on_result is not None:
            on_result(done[i])

    engines.replay_each(jobs, progress, landed)
    return [done[i] for i in range(len(specs))]


def run_for_cache(spec: RunSpec) -> dict[str, Any]:
    """``run(spec).to_json()``: what crosses a process (or Ray) boundary and what the disk cache holds."""
    return run(spec).to_json()


def _cluster_config(spec: RunSpec) -> Any:
    from fairbatching.cluster import ClusterConfig
    from fairbatching.cluster.simulator import homogeneous

    shape = spec.cluster
    assert shape is not None
    return ClusterConfig(
        homogeneous(shape.nodes, spec.policy, spec.profile),
        spec.slo,
        router=shape.router,
        admission=spec.admission,
        report_interval=shape.report_interval,
        report_delay=shape.report_delay,
        seed=spec.seed,
        prefix_caching=spec.prefix_caching,
    )


def _run_cluster(spec: RunSpec, w: Workload) -> RunResult:
    from fairbatching.cluster import simulate_cluster

    res = simulate_cluster(w, _cluster_config(spec))
    return _cluster_result(spec, w, res)


def _cluster_result(spec: RunSpec, w: Workload, res: Any) -> RunResult:
    assert spec.cluster is not None
    _check_accounted(len(res.requests), len(w), "cluster")
    busy = res.busy_time / spec.cluster.nodes
    summary = summarize(spec.label, w.name, res.requests, res.end_time, busy, res.preemptions, spec.prefix_caching)
    return RunResult(spec, summary, None, res.requests)


def _cluster_on_engines(spec: RunSpec, engines: Engines, progress: Progress | None) -> RunResult:
    """A cluster spec on the engines (one per node, behind the cluster simulator's router), with its simulation."""
    w = family(spec.workload).build(spec.qps, spec.seed, spec.num_requests)
    result = _cluster_result(spec, w, engines.replay(w, _cluster_config(spec), spec.seed, progress))
    result.sim = _run_cluster(spec.simulated(), w).summary
    return result


def _check_accounted(got: int, submitted: int, where: str) -> None:
    if got != submitted:
        raise RuntimeError(f"{where} accounted for {got} of {submitted} requests")


@dataclass
class Experiment:
    """One workload already in memory, one profile, one SLO, run under one or more policies.

    ``profile`` is what the policies plan with; ``pricing`` (default: the same) is what steps cost, and
    ``step_error`` how executed steps depart from it, so planning under model error can be studied offline.
    With ``engines`` (the GPU backend) every policy replays on them in real time instead, and each result
    carries the simulator's summary of the same run (``RunResult.sim``)."""

    workload: Workload
    profile: Profile
    slo: SLO = DEFAULT_SLO
    max_model_len: int = MAX_MODEL_LEN
    queue_timeout: float | None = None
    admission: Admission = Admission.NONE
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pricing: Profile | None = None
    step_error: StepError | None = None
    engines: Engines = None
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        check_slo_feasible(self.slo, self.profile)
        if self.engines is not None and (self.pricing is not None or self.step_error is not None):
            raise ConfigError("on GPU engines the steps cost what the GPU takes: drop pricing and step_error")
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
        """``policy`` on this experiment's backend: the simulator, or a replay on the engines."""
        if self.engines is None:
            return self.simulate(policy, progress)
        return self.run_all([policy], None if progress is None else lambda _p, d, t: progress(d, t))[0]

    def run_all(self, policies: list[str], progress: Callable[[str, int, int], None] | None = None) -> list[RunResult]:
        """Every policy, in order; on engines as many at once as there are engines. ``progress(policy, ended,
        total)`` follows each one's requests."""
        if self.engines is None:
            each = (None if progress is None else lambda d, t, p=p: progress(p, d, t) for p in policies)
            return [self.simulate(p, step) for p, step in zip(policies, each, strict=True)]
        jobs = [self.replay_job(p) for p in policies]
        on_job = None if progress is None else lambda i, d, t: progress(policies[i], d, t)
        results = self.engines.replay_each(jobs, on_job)
        return [self.engine_result(p, res) for p, res in zip(policies, results, strict=True)]

    def replay_job(self, policy: str, seed: int = 0) -> Any:
        """What an engine replica replays for ``policy`` (``engine.cluster.ReplayJob``)."""
        from fairbatching.engine.cluster import ReplayJob

        options = tuple(sorted(self.policy_options.get(policy, {}).items()))
        return ReplayJob(
            self.workload,
            policy,
            self.profile,
            self.slo,
            options,
            self.admission,
            self.queue_timeout,
            seed,
            self.prefix_caching,
        )

    def engine_result(self, policy: str, res: Any) -> RunResult:
        """An engine replay's ``NodeResult`` as a result, with the simulator's prediction of the same run."""
        _check_accounted(len(res.requests), len(self.workload), "engine")
        w, caching = self.workload, self.prefix_caching
        summary = summarize(policy, w.name, res.requests, res.end_time, res.busy_time, res.preemptions, caching)
        return RunResult(None, summary, res.log, res.requests, sim=self.simulate(policy).summary)

    def simulate(self, policy: str, progress: Progress | None = None) -> RunResult:
        """``policy`` on the simulator (on any backend: it is what a GPU result is shown beside)."""
        cost = self.profile.cost_model()
        pol = make_policy(policy, cost, tpot_slo=self.slo.tpot, **self.policy_options.get(policy, {}))
        priced = self.pricing or self.profile
        cfg = NodeConfig(
            default_slo=self.slo,
            kv=priced.kv,
            max_model_len=self.max_model_len,
            queue_timeout=self.queue_timeout,
            admission=self.admission,
            prefix_caching=self.prefix_caching,
        )
        res = simulate(pol, pricing_model(priced.cost_model(), self.step_error), self.workload, cfg, progress)
        _check_accounted(len(res.requests), len(self.workload), "simulator")
        summary = summarize(
            policy,
            self.workload.name,
            res.requests,
            res.end_time,
            res.busy_time,
            res.preemptions,
            self.prefix_caching,
        )
        return RunResult(None, summary, res.log, res.requests)
