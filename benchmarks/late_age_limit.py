"""FairBatching's ``late_age_limit``: SLO attainment against the P99 TTFT tail of the requests it gives up on.

At each scenario's best-baseline capacity (results/evaluation-engine), 3 windows (seeds 0-2) of 2,000
requests on the default profile, for no limit and limits of 1.5, 2 and 3 TTFT SLOs waited.

  PYTHONPATH=src python3 benchmarks/late_age_limit.py
"""

from __future__ import annotations

import statistics

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.runs import Experiment
from fairbatching.workloads.families import family

SCENARIOS = (
    ("default", SLO(2.0, 0.1), 14.99),
    ("azure-conv", SLO(2.0, 0.1), 17.64),
    ("default", SLO(1.0, 0.05), 11.94),
)
LIMITS = (None, 1.5, 2.0, 3.0)


def main() -> None:
    prof = load_profile(None)
    print("| workload | SLO | req/s | late_age_limit | SLO met (mean) | P99 TTFT per window (s) |")
    print("|---|---|---:|---:|---:|---|")
    for name, slo, qps in SCENARIOS:
        for limit in LIMITS:
            options = {"fairbatching": {"late_age_limit": limit}} if limit else {}
            runs = [
                Experiment(family(name).build(qps, seed, 2000), prof, slo, policy_options=options).run("fairbatching")
                for seed in range(3)
            ]
            met = statistics.mean(r.summary.slo_attainment for r in runs)
            tails = " / ".join(f"{r.summary.ttft.p99:.2f}" for r in runs)
            print(
                f"| {name} | {slo.ttft:g} s / {slo.tpot * 1000:g} ms | {qps} | {limit or 'off'} | {met:.1%} | {tails} |"
            )


if __name__ == "__main__":
    main()
