"""The attainment / P99 TTFT trade, offline: FairBatching's step-budget floor (``min_budget_fraction``, in TPOTs)
against Sarathi and vLLM's policy on a GPU tail window, simulated the way the H200 ran it.

Policies plan on ``llama-3-8b-h200-engine`` (online calibration on); steps are priced by
``llama-3-8b-h200-serving`` (the refit on GPU call 1 of results/gpu-tail) with 5% log-normal noise, which put
conv-1s at 29.43 req/s within 2 points and 0.03 s of its GPU replays for all three policies.

  PYTHONPATH=src python3 benchmarks/tail_frontier.py --point conv-1s@29.43 --point conv-2s@21.67
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gpu_tail import PROFILE, SCENARIOS, Variant, simulate  # noqa: E402

from fairbatching.serving.pricing import StepError  # noqa: E402

PRICING = "llama-3-8b-h200-serving"
FLOORS = (0.5, 1.0, 1.5, 2.0, 3.0)  # 0.5 is the default


def one(job: tuple[str, float, str, float | None]) -> str:
    scenario, qps, policy, floor = job
    options = () if floor is None else (("min_budget_fraction", floor),)
    label = policy if floor is None else f"{policy} floor {floor:g}"
    variant = Variant(label, policy, options)
    s = simulate(
        SCENARIOS[scenario], variant, qps, profile=PROFILE, pricing=PRICING, step_error=StepError(noise=0.05, seed=1)
    )
    return (
        f"| {scenario} | {qps:g} | {label} | {s['slo']:.1%} | {s['ttft_p50']:.2f} | {s['ttft_p99']:.2f} | "
        f"{s['tbt_p99'] * 1e3:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", action="append", required=True, metavar="SCENARIO@QPS")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    jobs = []
    for point in args.point:
        name, _, qps = point.partition("@")
        try:
            rate = float(qps)
        except ValueError:
            rate = math.nan
        if name not in SCENARIOS or not (math.isfinite(rate) and rate > 0):
            what = f"unknown scenario {name!r}" if name not in SCENARIOS else f"{qps!r} is not a positive rate"
            print(f"error: --point {point!r}: {what}", file=sys.stderr)
            sys.exit(2)
        jobs += [(name, rate, p, None) for p in ("sarathi", "vllm")]
        jobs += [(name, rate, "fairbatching", f) for f in FLOORS]
    print("| scenario | req/s | policy | SLO met | P50 TTFT s | P99 TTFT s | P99 TBT ms |")
    print("|---|---:|---|---:|---:|---:|---:|")
    try:
        with ProcessPoolExecutor(args.cpus) as pool:
            for line in pool.map(one, jobs):
                print(line, flush=True)
    except KeyboardInterrupt:
        print("interrupted: the rows printed so far are whole", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
