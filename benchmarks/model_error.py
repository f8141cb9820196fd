"""Robustness to model error, in the simulator: each policy with steps priced exactly as it plans, and with
steps that cost more than its model says (a bias on steps carrying prefill, a per-step host overhead,
per-step noise), on several trace windows. A policy that plans to the edge of its model loses SLOs here
the way it does on a GPU whose steps the profile under-predicts.

  PYTHONPATH=src python3 benchmarks/model_error.py --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv \\
      --ttft 1 --tpot 0.05 --qps 11 --starts 2000,6000,12000 -n 400
"""

from __future__ import annotations

import argparse
import json
import statistics

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.runs import Experiment, WorkloadSpec
from fairbatching.serving.pricing import StepError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=None)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--ttft", type=float, default=1.0)
    ap.add_argument("--tpot", type=float, default=0.05)
    ap.add_argument("--qps", type=float, required=True)
    ap.add_argument("-n", type=int, default=400)
    ap.add_argument("--starts", default="2000,6000,12000")
    ap.add_argument("--policies", default="fairbatching,sarathi,vllm")
    ap.add_argument("--mixed-scale", type=float, default=1.15)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--overhead", type=float, default=0.002)
    ap.add_argument("-o", "--option", action="append", default=[], help="policy.key=value (JSON value)")
    ap.add_argument("--no-calibrate", action="store_true")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    slo = SLO(args.ttft, args.tpot)
    options: dict = {}
    for item in args.option:
        key, value = item.split("=", 1)
        pol, opt = key.split(".", 1)
        options.setdefault(pol, {})[opt] = json.loads(value)
    if args.no_calibrate:
        for pol in args.policies.split(","):
            options.setdefault(pol, {})["calibrate"] = False
    errors = {
        "exact": None,
        "error": StepError(args.scale, args.mixed_scale, args.noise, args.overhead),
    }
    for policy in args.policies.split(","):
        for tag, err in errors.items():
            slos, p99, tpot_ok, ttft_ok = [], [], [], []
            for start in map(int, args.starts.split(",")):
                w = WorkloadSpec(args.trace, num_requests=args.n, start=start, qps=args.qps).build()
                exp = Experiment(w, profile, slo, policy_options=options, step_error=err)
                s = exp.run(policy).summary
                slos.append(s.slo_attainment)
                p99.append(s.ttft.p99)
                tpot_ok.append(s.tpot_attainment)
                ttft_ok.append(s.ttft_attainment)
            print(
                f"{policy:13s} {tag:6s} SLO {statistics.mean(slos):6.1%}"
                f" (windows {', '.join(f'{x:.0%}' for x in slos)})"
                f" TTFT ok {statistics.mean(ttft_ok):6.1%} TPOT ok {statistics.mean(tpot_ok):6.1%}"
                f" P99 TTFT {statistics.mean(p99):6.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
