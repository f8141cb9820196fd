"""How the simulator's calibrated step model should be fitted, checked against recorded GPU runs on the CPU.

Each run folder of results/gpu-engine holds a validation table (GPU columns measured), the grid profile the
policies planned with (profile.json, rows.csv) and the steps of that run's calibration replay
(calibration_steps.csv). For every pair of runs on the same profile, every calibration method is fitted on
one run's calibration steps and the validation cells of the other are simulated again: the P50 TTFT and
mean TPOT error against the GPU, and whether the P99 TTFT ranking of the policies matches.

Methods: ``serving`` (shipped in gpu_engine.py): the calibration replay's steps at their periods (step plus
the loop's host time to the next one), relative error; ``grid+serving`` (session 4): the grid rows plus the
calibration steps at their step times.

  PYTHONPATH=src python3 benchmarks/calibration_choice.py results/gpu-engine results/gpu-engine/replays \\
      results/gpu-engine/absolute-calibration results/gpu-engine/absolute-calibration/replays \\
      --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.costmodel.fit import fit_cost_model, load_profile_rows
from fairbatching.costmodel.profile import Profile
from fairbatching.metrics.summary import summarize
from fairbatching.policies import make_policy
from fairbatching.serving.node import NodeConfig
from fairbatching.serving.simulator import simulate
from fairbatching.workloads.traces import load_trace

FEATURES = ("new_tokens", "context_tokens", "num_seqs", "attn_work")


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def calibration_rows(run: Path, column: str) -> np.ndarray:
    return np.array([[float(r[k]) for k in (*FEATURES, column)] for r in read_csv(run / "calibration_steps.csv")])


METHODS = {
    "serving": lambda run: calibration_rows(run, "period"),
    "grid+serving": lambda run: np.vstack([load_profile_rows(run / "rows.csv"), calibration_rows(run, "seconds")]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.1)
    ap.add_argument("--out", type=Path, help="CSV of every method x calibration x validation")
    args = ap.parse_args()
    slo = SLO(args.ttft_slo, args.tpot_slo)
    base = load_trace(args.trace).head(args.requests)
    results = []
    for calib_run, valid_run in itertools.product(args.runs, repeat=2):
        profile = Profile.load(valid_run / "profile.json")
        if Profile.load(calib_run / "profile.json").params != profile.params:
            continue
        plan_cost = profile.cost_model()
        config = NodeConfig(slo, profile.kv, max_model_len=16384)
        cells = read_csv(valid_run / "validation.csv")
        for method, rows_of in METHODS.items():
            model = fit_cost_model(rows_of(calib_run)).model
            p50, tpot, p99 = [], [], {}
            for cell in cells:
                qps, policy = float(cell["qps"]), cell["policy"]
                w = base.rescaled(qps)
                res = simulate(make_policy(policy, plan_cost, tpot_slo=slo.tpot), model, w, config)
                s = summarize(policy, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
                p50.append(s.ttft.p50 / float(cell["gpu_ttft_p50"]) - 1)
                tpot.append(s.tpot.mean / float(cell["gpu_tpot_mean"]) - 1)
                p99.setdefault(qps, {})[policy] = (s.ttft.p99, float(cell["gpu_ttft_p99"]))
            agree = sum(
                (v["fairbatching"][0] < v["sarathi"][0]) == (v["fairbatching"][1] < v["sarathi"][1])
                for v in p99.values()
            )
            row = {
                "method": method,
                "calibration": str(calib_run),
                "validation": str(valid_run),
                "p50_within_10pct": sum(abs(e) <= 0.1 for e in p50),
                "cells": len(p50),
                "p50_max_abs_error": max(map(abs, p50)),
                "tpot_max_abs_error": max(map(abs, tpot)),
                "p99_ranking_agrees": agree,
                "loads": len(p99),
            }
            results.append(row)
            print(
                f"{method:13s} calib {str(calib_run):45s} valid {str(valid_run):45s} P50 within 10%: "
                f"{row['p50_within_10pct']}/{row['cells']} (max {row['p50_max_abs_error']:.1%}) | TPOT max "
                f"{row['tpot_max_abs_error']:.1%} | P99 ranking {agree}/{len(p99)}",
                flush=True,
            )
    for method in METHODS:
        mine = [r for r in results if r["method"] == method]
        print(
            f"{method}: P50 TTFT within 10% in {sum(r['p50_within_10pct'] for r in mine)} of "
            f"{sum(r['cells'] for r in mine)} cells; P99 ranking agrees at {sum(r['p99_ranking_agrees'] for r in mine)}"
            f" of {sum(r['loads'] for r in mine)} loads"
        )
    if args.out:
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)


if __name__ == "__main__":
    main()
