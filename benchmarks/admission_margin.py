"""Does node admission refuse at the right margin? FairBatching with ``--admission reject`` admits a request at
arrival when its prompt fits the Prefill Admission Budget; this scales that check (admit when the prompt is at
most ``margin`` x the budget: below 1 stricter, above 1 looser, ``inf`` = refuse only once the TTFT is lost) and
compares SLO attainment, P99 TTFT and refusals, with FairBatching without admission beside them.

Simulated: policies plan on the engine profile; steps are priced by the serving profile refit on GPU steps,
with 5% log-normal noise. Two sets of windows: ``gpu`` (the GPU tail windows at 0.85-1.15x, whose calls the
H100 refit was fitted on in part: a model of those replays) and ``held-out`` (Azure conversation from 2000, 6000
and 18000 at both SLOs, Azure code from 5000, mixed SLO classes seeds 11-12: windows no rule was chosen on).

  PYTHONPATH=src python3 benchmarks/admission_margin.py --gpu h200 --windows held-out
  PYTHONPATH=src python3 benchmarks/admission_margin.py --gpu h100 --windows gpu
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fairbatching.core.request import SLO
from fairbatching.policies import admission
from fairbatching.serving.pricing import StepError

sys.path.insert(0, str(Path(__file__).parent))
import gpu_tail  # noqa: E402  (the scenarios and windows of the GPU replays)

PROFILES = {
    "h200": ("llama-3-8b-h200-engine", "llama-3-8b-h200-serving", Path("results/gpu-tail/plan.json"), 1.0),
    "h100": ("llama-3-8b-h100-engine", "llama-3-8b-h100-serving", Path("results/gpu-tail-h100/plan.json"), 0.8),
}
MARGINS = (None, 0.5, 0.75, 1.0, math.inf)  # None: no admission


def run(job: tuple) -> tuple:
    gpu, sc, qps, margin = job
    plan_profile, pricing, _, _ = PROFILES[gpu]
    if margin is not None:
        admission.AdmissionBudget.fits = lambda self, p: p <= margin * self.tokens_within(self.horizon)
    variant = gpu_tail.Variant("fairbatching", "fairbatching", admission="none" if margin is None else "reject")
    noise = StepError(noise=0.05, seed=sc.seed + sc.start)
    exp = gpu_tail.experiment(sc, variant, qps, profile=plan_profile, pricing=pricing, step_error=noise)
    s = exp.run("fairbatching").summary
    return sc.name, qps, margin, s.slo_attainment, s.ttft.p99, s.rejected


def jobs(gpu: str, windows: str) -> list[tuple]:
    _, _, plan, scale = PROFILES[gpu]
    if windows == "gpu":
        rows = json.loads(plan.read_text())["rows"]
        names = ("conv-2s-b", "conv-1s-b") if gpu == "h100" else ("conv-2s", "conv-1s")
        base = {r["scenario"]: r["base_rps"] for r in rows}
        points = [(gpu_tail.SCENARIOS[n], round(base[n] * load, 2)) for n in names for load in (0.85, 1.0, 1.15)]
    else:
        conv = [
            (gpu_tail.Scenario(f"conv-{slo.ttft:g}s@{start}", "azure-conv", slo, 600, start), loads)
            for start in (2000, 6000, 18000)
            for slo, loads in ((SLO(2.0, 0.1), (20, 23, 26)), (SLO(1.0, 0.05), (28, 32, 36)))
        ]
        code = [(gpu_tail.Scenario("code@5000", "azure-code", SLO(2.0, 0.1), 200, 5000), (9, 11, 13))]
        mixed = [
            (gpu_tail.Scenario(f"mixed-slo@{seed}", "mixed-slo", SLO(0.5, 0.05), 300, 0, seed), (13, 15, 17))
            for seed in (11, 12)
        ]
        points = [(sc, round(q * scale, 2)) for sc, loads in conv + code + mixed for q in loads]
    return [(gpu, sc, qps, m) for sc, qps in points for m in MARGINS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", choices=tuple(PROFILES), default="h200")
    ap.add_argument("--windows", choices=("gpu", "held-out"), default="held-out")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    with ProcessPoolExecutor(args.cpus) as pool:
        results = list(pool.map(run, jobs(args.gpu, args.windows)))
    names = ["no admission" if m is None else "lost only" if m == math.inf else f"margin {m:g}" for m in MARGINS]
    print("SLO met / P99 TTFT s / refused, per window and load:\n")
    print("| window | req/s | " + " | ".join(names) + " |")
    print("|---|---:|" + "---|" * len(MARGINS))
    points = list(dict.fromkeys((r[0], r[1]) for r in results))
    by = {(r[0], r[1], r[2]): r for r in results}
    for name, qps in points:
        cells = [by[(name, qps, m)] for m in MARGINS]
        print(f"| {name} | {qps} | " + " | ".join(f"{c[3]:.1%} / {c[4]:.2f} / {c[5]}" for c in cells) + " |")
    print("\n| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(MARGINS))
    mean = [statistics.mean(by[(n, q, m)][3] for n, q in points) for m in MARGINS]
    p99 = [statistics.mean(by[(n, q, m)][4] for n, q in points) for m in MARGINS]
    refused = [sum(by[(n, q, m)][5] for n, q in points) for m in MARGINS]
    print("| mean SLO met | " + " | ".join(f"{x:.2%}" for x in mean) + " |")
    print("| mean P99 TTFT s | " + " | ".join(f"{x:.2f}" for x in p99) + " |")
    print("| refused in all | " + " | ".join(str(x) for x in refused) + " |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
