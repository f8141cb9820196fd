"""Hit rate, SLO attainment and P99 TTFT of each single-node stack at one load per workload (simulated).

Run from the repository root: PYTHONPATH=src python results/prefix-caching/hit_rates.py
"""

import json

from fairbatching.runs import RunSpec, run

POINTS = (("multi-turn", 10.95, 2.0, 2000), ("mooncake-conv", 0.715, 10.0, 1000))  # FairBatching's uncached capacity
rows = []
for workload, qps, ttft, n in POINTS:
    for policy in ("fairbatching", "vllm"):
        for caching in (False, True):
            s = run(RunSpec(policy, workload, qps, 0, n, ttft, 0.1, prefix_caching=caching)).summary
            rows.append(
                {
                    "workload": workload,
                    "qps": qps,
                    "policy": policy,
                    "prefix_caching": caching,
                    "prefix_hit_rate": s.prefix_hit_rate,
                    "slo_attainment": s.slo_attainment,
                    "ttft_p99_s": s.ttft.p99,
                    "gpu_busy": s.gpu_busy,
                }
            )
            print(json.dumps(rows[-1]))
with open("results/prefix-caching/hit_rates.json", "w") as f:
    json.dump(rows, f, indent=2)
    f.write("\n")
