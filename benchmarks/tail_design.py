"""FairBatching's handling of lost prefills, offline: SLO attainment and P99 TTFT against Sarathi and vLLM's
policy, under model error, at the best baseline's capacity and 1.15x / 1.3x of it.

On the H200 serving profile (``llama-3-8b-h200-engine``, online calibration on, as on the GPU) steps carrying
prefill cost ``--mixed-scale`` times the profile with log-normal noise ``--noise`` (the GPU measured 1.07-1.29x on
prefill-carrying steps, ~1.0x decode-only). The best baseline's capacity (mean attainment 90%) is searched under
the same error on the same windows. Trace windows are picked by seed: tune on one set (default 11,12), validate
on another (``--seeds 21,22,23``); the GPU replays use seeds 1-3, so neither set is theirs.

  PYTHONPATH=src python3 benchmarks/tail_design.py --seeds 11,12
  PYTHONPATH=src python3 benchmarks/tail_design.py --seeds 21,22,23 --only fb,age3,a1s20
  PYTHONPATH=src python3 benchmarks/tail_design.py --seeds 21,22,23 --only fb,alone --admission reject
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.metrics.summary import Summary
from fairbatching.runs import Experiment
from fairbatching.serving.pricing import StepError
from fairbatching.workloads.families import family


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    slo: SLO
    requests: int
    guess: float  # a starting rate for the capacity search (req/s)
    target: float = 0.9  # the attainment that defines capacity


SCENARIOS = (
    Scenario("conv 2s/100ms", "azure-conv", SLO(2.0, 0.1), 600, 40.0),
    Scenario("conv 1s/50ms", "azure-conv", SLO(1.0, 0.05), 600, 24.0),
    Scenario("code 2s/100ms", "azure-code", SLO(2.0, 0.1), 600, 5.0),
    # Every request carries its class's SLO; the default (the tight class) sizes Sarathi's token budget.
    Scenario("mixed 0.5s/50ms+8s/200ms", "mixed-slo", SLO(0.5, 0.05), 600, 15.0),
    # Long prompts (mean 13.8k tokens), short outputs (mean 357): the long-prompt shape. Some prompts cannot
    # prefill within 10 s even alone, so the baselines top out near 88% at any load: capacity here is 85%.
    Scenario("mooncake 10s/100ms", "mooncake-conv", SLO(10.0, 0.1), 600, 1.0, 0.85),
)
BASELINES = ("sarathi", "vllm")
# name -> FairBatching options
CANDIDATES: dict[str, dict[str, Any]] = {
    "fb": {},
    "age2": {"late_age_limit": 2.0},
    "age3": {"late_age_limit": 3.0},
    "a1s10": {"late_age_limit": 1.0, "late_share": 0.1},
    "a1s20": {"late_age_limit": 1.0, "late_share": 0.2},
    "a1s35": {"late_age_limit": 1.0, "late_share": 0.35},
    "a15s20": {"late_age_limit": 1.5, "late_share": 0.2},
    "a2s20": {"late_age_limit": 2.0, "late_share": 0.2},
    "a2s35": {"late_age_limit": 2.0, "late_share": 0.35},
    "a2s50": {"late_age_limit": 2.0, "late_share": 0.5},
    "a15s50": {"late_age_limit": 1.5, "late_share": 0.5},
    "a3s10": {"late_age_limit": 3.0, "late_share": 0.1},
    "a3s20": {"late_age_limit": 3.0, "late_share": 0.2},
    "a3s35": {"late_age_limit": 3.0, "late_share": 0.35},
    "a3s50": {"late_age_limit": 3.0, "late_share": 0.5},
    "alone": {"queue_margin": None},  # feasibility judged alone: the default before queue feasibility
    "qm0": {"queue_margin": 0.0},
    "qm1": {"queue_margin": 1.0},
}


def run(
    sc: Scenario,
    policy: str,
    options: dict[str, Any],
    qps: float,
    seeds: list[int],
    err: StepError,
    admission: str = "none",
) -> list[Summary]:
    prof = load_profile("llama-3-8b-h200-engine")
    out = []
    for seed in seeds:
        w = family(sc.workload).build(qps, seed, sc.requests)
        exp = Experiment(w, prof, sc.slo, policy_options={policy: options}, step_error=err, admission=admission)
        out.append(exp.run(policy).summary)
    return out


def attainment(sums: list[Summary]) -> float:
    return statistics.mean(s.slo_attainment for s in sums)


def capacity(
    sc: Scenario,
    policy: str,
    seeds: list[int],
    err: StepError,
    options: dict[str, Any] | None = None,
    admission: str = "none",
) -> float:
    """Highest rate with mean attainment >= the scenario's target: bracket by x1.15 steps, then bisect to 2%."""

    def met(qps: float) -> bool:
        return attainment(run(sc, policy, options or {}, qps, seeds, err, admission)) >= sc.target

    lo = hi = sc.guess
    if met(hi):
        while met(hi * 1.15):
            hi *= 1.15
        lo, hi = hi, hi * 1.15
    else:
        while not met(lo / 1.15):
            lo /= 1.15
            if lo < sc.guess / 50:
                raise SystemExit(f"{sc.name}: {policy} never reaches {sc.target:.0%}")
        lo, hi = lo / 1.15, lo
    while hi / lo > 1.02:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if met(mid) else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="11,12", help="trace windows (workload family seeds)")
    ap.add_argument("--loads", default="1.0,1.15,1.3", help="multiples of the best baseline's capacity")
    ap.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--scenarios", default=None, help="comma-separated scenario name prefixes")
    ap.add_argument("--capacity", action="store_true", help="also each candidate's capacity (x best baseline)")
    ap.add_argument("--mixed-scale", type=float, default=1.18)
    ap.add_argument("--noise", type=float, default=0.08)
    ap.add_argument("--admission", default="none", help="node admission of the FairBatching candidates (none, reject)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    err = StepError(1.0, args.mixed_scale, args.noise)
    names = list(CANDIDATES) if args.only is None else args.only.split(",")
    wanted = None if args.scenarios is None else args.scenarios.split(",")
    print(f"seeds {seeds}, {err}, FairBatching's node admission: {args.admission}")
    print("| scenario | load | policy | SLO met (mean) | P99 TTFT mean / worst window (s) | refused |")
    print("|---|---|---|---:|---|---:|")
    for sc in SCENARIOS:
        if wanted and not any(sc.name.startswith(w) for w in wanted):
            continue
        caps = {p: capacity(sc, p, seeds, err) for p in BASELINES}
        best = max(caps.values())
        named = ", ".join(f"{p} {c:.2f}" for p, c in caps.items())
        print(f"| {sc.name} | capacity | {named} | | | |", flush=True)
        if args.capacity:
            for n in names:
                c = capacity(sc, "fairbatching", seeds, err, CANDIDATES[n], args.admission)
                print(f"| {sc.name} | capacity | {n} {c:.2f} = {c / best:.2f}x | | | |", flush=True)
        for factor in map(float, args.loads.split(",")):
            qps = best * factor
            rows = [(p, run(sc, p, {}, qps, seeds, err)) for p in BASELINES]
            rows += [(n, run(sc, "fairbatching", CANDIDATES[n], qps, seeds, err, args.admission)) for n in names]
            for name, sums in rows:
                p99 = [s.ttft.p99 for s in sums]
                print(
                    f"| {sc.name} | {factor:g}x = {qps:.2f} | {name} | {attainment(sums):.1%} |"
                    f" {statistics.mean(p99):.2f} / {max(p99):.2f} | {sum(s.rejected for s in sums)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
