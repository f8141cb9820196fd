"""Simulator throughput and policy decision latency (run on demand: ``python benchmarks/bench_simulator.py``).

1. Simulated requests per wall-second for each policy on 10k-request traces (Azure code and conversation
   from ../shared/traces at their recorded rates; a synthetic 10k workload if those are absent).
2. Mean / P99 time of one ``schedule`` call with 64, 256 and 1024 running requests, with ratios against
   vLLM's decode-first policy measured in the same run.
Targets (issue 2): >= 10k simulated requests per wall-second; < 100 us per decision at 256 running.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fairbatching.core import SLO, BlockAllocator, KVCacheConfig, Request
from fairbatching.core.request import RequestStatus
from fairbatching.costmodel import load_profile
from fairbatching.policies import POLICIES, SchedulerState, make_policy
from fairbatching.sim import SimConfig, simulate
from fairbatching.workloads import load_trace, synthetic_workload

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
SLO_ = SLO(ttft=2.0, tpot=0.1)


def workloads(n: int) -> dict:
    out = {}
    for name, file in (
        ("azure-code", "AzureLLMInferenceTrace_code.csv"),
        ("azure-conv", "AzureLLMInferenceTrace_conv.csv"),
    ):
        if (TRACES / file).is_file():
            w = load_trace(TRACES / file)
            out[name] = w.head(min(n, len(w)))
    if not out:
        out["synthetic"] = synthetic_workload(n, qps=10, burstiness=2, seed=0)
    return out


def bench_simulator(n: int, repeats: int) -> list[dict]:
    prof = load_profile()
    cost = prof.cost_model()
    rows = []
    for wname, w in workloads(n).items():
        for policy in POLICIES:
            best = None
            for _ in range(repeats):
                pol = make_policy(policy, cost, tpot_slo=SLO_.tpot)
                t0 = time.perf_counter()
                res = simulate(pol, cost, w, SimConfig(default_slo=SLO_, kv=prof.kv, record_iterations=False))
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            tokens = sum(len(r.token_times) for r in res.requests)
            rows.append(
                {
                    "workload": wname,
                    "requests": len(w),
                    "policy": policy,
                    "wall_s": best,
                    "req_per_s": len(w) / best,
                    "iterations": res.iterations,
                    "output_tokens": tokens,
                }
            )
    return rows


def decision_state(n_running: int, n_waiting: int, seed: int) -> SchedulerState:
    rng = np.random.default_rng(seed)
    now = 1000.0
    running = []
    for i in range(n_running):
        prompt = int(rng.integers(200, 3000))
        r = Request(f"d{i}", now - 30.0, prompt, SLO_, slack_carry=0.0)
        r.num_computed = prompt
        for k in range(int(rng.integers(1, 300))):
            r.record_token(now - 20 + k * 0.01)
        r.num_computed = r.num_tokens - 1
        r.next_deadline = now + float(rng.uniform(-0.05, 3.0))
        r.num_blocks = -(-r.num_tokens // 16)
        r.status = RequestStatus.RUNNING
        running.append(r)
    queue = [
        Request(f"w{i}", now - float(rng.uniform(0, 2)), int(rng.integers(100, 4000)), SLO_) for i in range(n_waiting)
    ]
    kv = BlockAllocator(KVCacheConfig(num_blocks=200_000))
    kv.free_blocks -= sum(r.num_blocks for r in running)
    return SchedulerState(now, running, queue, kv)


def bench_decisions(sizes: list[int], calls: int) -> list[dict]:
    cost = load_profile().cost_model()
    rows = []
    for n in sizes:
        st = decision_state(n, 64, seed=n)
        for policy in POLICIES:
            pol = make_policy(policy, cost, tpot_slo=SLO_.tpot, max_num_seqs=max(n + 64, 256))
            times = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                pol.schedule(st)
                times.append(time.perf_counter_ns() - t0)
            t = np.array(times[calls // 10 :]) / 1e3  # drop warm-up
            rows.append(
                {"running": n, "policy": policy, "mean_us": float(t.mean()), "p99_us": float(np.percentile(t, 99))}
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    sim = bench_simulator(args.requests, args.repeats)
    head = ("workload", "policy", "requests", "wall s", "req/s", "vs vllm", "iters", "tokens")
    print("{:12s} {:14s} {:>8s} {:>7s} {:>8s} {:>8s} {:>8s} {:>9s}".format(*head))
    for r in sim:
        base = next(b for b in sim if b["workload"] == r["workload"] and b["policy"] == "vllm")
        print(
            f"{r['workload']:12s} {r['policy']:14s} {r['requests']:8d} {r['wall_s']:7.2f} {r['req_per_s']:8.0f} "
            f"{r['req_per_s'] / base['req_per_s']:7.2f}x {r['iterations']:8d} {r['output_tokens']:9d}"
        )
    dec = bench_decisions([64, 256, 1024], args.calls)
    print(f"\n{'running':>7s} {'policy':14s} {'mean us':>9s} {'p99 us':>9s} {'mean vs vllm':>13s}")
    for r in dec:
        base = next(b for b in dec if b["running"] == r["running"] and b["policy"] == "vllm")
        ratio = r["mean_us"] / base["mean_us"]
        print(f"{r['running']:7d} {r['policy']:14s} {r['mean_us']:9.1f} {r['p99_us']:9.1f} {ratio:12.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"simulator": sim, "decisions": dec}, indent=2) + "\n")


if __name__ == "__main__":
    main()
