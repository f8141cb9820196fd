"""One experiment = one workload, one profile, one SLO, one or more policies: the unit the CLI, the
benchmarks and the sweeps run. Keeps wiring (workload -> policy -> simulator -> summary) in one place."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import Profile
from fairbatching.errors import ConfigError
from fairbatching.metrics.summary import Summary, summarize
from fairbatching.policies import make_policy
from fairbatching.sim.pricing import StepError, pricing_model
from fairbatching.sim.simulator import SimConfig, SimResult, simulate
from fairbatching.validate import check_policy_options
from fairbatching.workloads.spec import Workload
from fairbatching.workloads.synthetic import default_workload
from fairbatching.workloads.traces import load_trace

DEFAULT_SLO = SLO(ttft=2.0, tpot=0.1)
# Load of the embedded default workload: the knee of the default (measured H100 engine) profile, where the
# policies' SLO attainment is ~90%, so scheduling decisions matter.
DEFAULT_QPS = 14.8
ADMISSION_MODES = ("none", "reject", "defer")


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


@dataclass
class RunResult:
    summary: Summary
    sim: SimResult


@dataclass
class Experiment:
    """``profile`` is what the policies plan with; ``pricing`` (default: the same) is what steps cost, and
    ``step_error`` how executed steps depart from it, so planning under model error can be studied offline."""

    workload: Workload
    profile: Profile
    slo: SLO = DEFAULT_SLO
    max_model_len: int = 131072
    queue_timeout: float | None = None
    admission: str = "none"
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pricing: Profile | None = None
    step_error: StepError | None = None

    def __post_init__(self) -> None:
        check_slo_feasible(self.slo, self.profile)
        if self.admission not in ADMISSION_MODES:
            raise ConfigError(f"admission must be one of {', '.join(ADMISSION_MODES)}, got {self.admission!r}")
        if self.queue_timeout is not None and not (math.isfinite(self.queue_timeout) and self.queue_timeout > 0):
            raise ConfigError(f"queue timeout must be a positive number of seconds, got {self.queue_timeout!r}")
        cost = self.profile.cost_model()
        for name, options in self.policy_options.items():  # bad options fail now, not halfway through a run
            check_policy_options(name, options, "policy option")
            try:
                make_policy(name, cost, tpot_slo=self.slo.tpot, **options)
            except ValueError as exc:  # a constraint between options that no single range expresses
                raise ConfigError(f"policy options {name} {options}: {exc}") from None

    def run(self, policy: str, progress: Callable[[int, int], None] | None = None) -> RunResult:
        cost = self.profile.cost_model()
        pol = make_policy(policy, cost, tpot_slo=self.slo.tpot, **self.policy_options.get(policy, {}))
        cfg = SimConfig(
            default_slo=self.slo,
            kv=(self.pricing or self.profile).kv,
            max_model_len=self.max_model_len,
            queue_timeout=self.queue_timeout,
            admission=self.admission,
        )
        price = pricing_model((self.pricing or self.profile).cost_model(), self.step_error)
        res = simulate(pol, price, self.workload, cfg, progress)
        if len(res.requests) != len(self.workload):
            raise RuntimeError(f"simulator accounted for {len(res.requests)} of {len(self.workload)} requests")
        summary = summarize(policy, self.workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
        return RunResult(summary, res)


def check_slo_feasible(slo: SLO, profile: Profile) -> None:
    """Reject SLOs no schedule can meet on this hardware: a TPOT below one lone decode step."""
    cost = profile.cost_model()
    step = cost.predict(1, 1, 1, 1.0)
    if slo.tpot < step:
        raise ConfigError(
            f"TPOT SLO {slo.tpot * 1e3:.2f} ms is below the fastest possible decode step "
            f"({step * 1e3:.2f} ms on profile {profile.name}): no policy can meet it"
        )
    if slo.ttft < step:
        raise ConfigError(
            f"TTFT SLO {slo.ttft * 1e3:.2f} ms is below the fastest possible iteration "
            f"({step * 1e3:.2f} ms on profile {profile.name}): no policy can meet it"
        )
