"""Simulator throughput and policy decision latency (run on demand: ``python benchmarks/bench_simulator.py``).

1. Simulated requests per wall-second for each policy on 10k-request traces (the bundled Azure code and
   conversation traces at their recorded rates).
2. The same at 0.9x and 1.1x of each policy's knee on 10k Azure conversation requests, where capacity
   searches spend their time (knee: the policy's capacity at 2 s / 100 ms in
   results/evaluation-engine/evaluation.json).
3. Mean / P99 time of one ``schedule`` call with 64, 256 and 1024 running requests, with ratios against
   vLLM's decode-first policy measured in the same run.
4. The 64-node one-hour cluster run (the whole Azure conversation trace, PAB router, 0.5 s reports).
5. CLI start-up: ``fairbatching simulate --help``, ``compare --help`` and ``profiles`` in a fresh interpreter
   (best of 5).
Targets (issue 20): >= 10k simulated requests per wall-second at 0.9x/1.1x knee; a FairBatching decision at
256 running <= 40 us and <= 1.5x vLLM's policy; the 64-node one-hour cluster under 20 s.

``--builds pure,compiled`` runs the chosen sections once on the source and once on a mypyc build made for
the run (``_build/inplace.py``, what ``pip install .`` installs), one after the other, and prints the
compiled/pure ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fairbatching.cluster import ClusterConfig, simulate_cluster
from fairbatching.cluster.simulator import homogeneous
from fairbatching.core import SLO, BlockAllocator, KVCacheConfig, Request
from fairbatching.core.request import RequestStatus
from fairbatching.costmodel import load_profile
from fairbatching.policies import POLICIES, SchedulerState, make_policy
from fairbatching.serving import NodeConfig, simulate
from fairbatching.workloads import load_trace
from fairbatching.workloads.bundled import resolve_trace

ROOT = Path(__file__).resolve().parents[1]
EVALUATION = ROOT / "results" / "evaluation-engine" / "evaluation.json"
BUILDS = ("pure", "compiled")
SLO_ = SLO(ttft=2.0, tpot=0.1)


def workloads(n: int) -> dict:
    return {name: load_trace(resolve_trace(name)).head(n) for name in ("azure-code", "azure-conv")}


def knee_workloads(n: int) -> dict[str, dict]:
    """``{policy: {label: workload}}`` at 0.9x and 1.1x of each policy's knee (empty without the inputs)."""
    if not EVALUATION.is_file():
        return {}
    knees = {
        row["policy"]: row["capacity_qps"]
        for row in json.loads(EVALUATION.read_text())
        if row["workload"] == "azure-conv" and (row["ttft_slo"], row["tpot_slo"]) == (SLO_.ttft, SLO_.tpot)
    }
    conv = load_trace(resolve_trace("azure-conv")).head(n)
    return {
        policy: {f"conv {f:.1f}x knee": conv.rescaled(f * qps) for f in (0.9, 1.1)}
        for policy, qps in knees.items()
        if qps
    }


def bench_simulator(n: int, repeats: int, at_knee: bool = False) -> list[dict]:
    prof = load_profile()
    cost = prof.cost_model()
    rows = []
    if at_knee:
        cases = [(label, policy, w) for policy, ws in knee_workloads(n).items() for label, w in ws.items()]
    else:
        cases = [(wname, policy, w) for wname, w in workloads(n).items() for policy in POLICIES]
    for wname, policy, w in cases:
        best = cpu = None
        for _ in range(repeats):
            pol = make_policy(policy, cost, tpot_slo=SLO_.tpot)
            c0, t0 = time.process_time(), time.perf_counter()
            res = simulate(pol, cost, w, NodeConfig(default_slo=SLO_, kv=prof.kv, record_iterations=False))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best = dt if best is None else min(best, dt)
            cpu = dc if cpu is None else min(cpu, dc)
        tokens = sum(len(r.token_times) for r in res.requests)
        rows.append(
            {
                "workload": wname,
                "qps": w.qps,
                "requests": len(w),
                "policy": policy,
                "wall_s": best,
                "req_per_s": len(w) / best,
                "cpu_s": cpu,  # this process's CPU time: what other users of a shared machine do not inflate
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
                {
                    "running": n,
                    "policy": policy,
                    "mean_us": float(t.mean()),
                    "median_us": float(np.median(t)),  # robust to the preemptions of a shared machine
                    "p99_us": float(np.percentile(t, 99)),
                }
            )
    return rows


def bench_cluster(nodes: int) -> dict:
    """Wall time of the whole one-hour Azure conversation trace on ``nodes`` FairBatching nodes (PAB)."""
    hour = load_trace(resolve_trace("azure-conv"))
    cfg = ClusterConfig(homogeneous(nodes, "fairbatching"), SLO_, router="pab", report_interval=0.5)
    c0, t0 = time.process_time(), time.perf_counter()
    res = simulate_cluster(hour, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"nodes": nodes, "requests": len(hour), "sim_s": res.end_time, "wall_s": wall, "cpu_s": cpu}


STARTUP_COMMANDS = ("simulate --help", "compare --help", "profiles")


def bench_startup(runs: int = 5) -> dict[str, float]:
    """Best wall time of each start-up command in a fresh interpreter, the commands interleaved."""
    best = dict.fromkeys(STARTUP_COMMANDS, float("inf"))
    for _ in range(runs):
        for command in STARTUP_COMMANDS:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fairbatching", *command.split()], check=True, capture_output=True)
            best[command] = min(best[command], time.perf_counter() - t0)
    return best


def print_sim(rows: list[dict]) -> None:
    head = ("workload", "policy", "req/s*", "requests", "wall s", "req/s", "cpu s", "req/cpu-s", "vs vllm", "iters")
    print("{:18s} {:14s} {:>7s} {:>8s} {:>7s} {:>8s} {:>7s} {:>9s} {:>8s} {:>8s}".format(*head))
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["policy"] == "vllm"), r)
        print(
            f"{r['workload']:18s} {r['policy']:14s} {r['qps']:7.2f} {r['requests']:8d} {r['wall_s']:7.2f} "
            f"{r['req_per_s']:8.0f} {r['cpu_s']:7.2f} {r['requests'] / r['cpu_s']:9.0f} "
            f"{r['req_per_s'] / base['req_per_s']:7.2f}x {r['iterations']:8d}"
        )


SECTIONS = ("recorded", "knee", "decisions", "cluster", "startup")


def this_build() -> str:
    import fairbatching.policies.base

    return "compiled" if fairbatching.policies.base.__file__.endswith(".so") else "pure"


def run_builds(builds: list[str], argv: list[str]) -> dict[str, dict]:
    """This script with ``argv`` on each build in turn (a fresh interpreter each), their results by build."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for build in builds:
            if build == "pure":
                src = ROOT / "src"
            else:
                made = subprocess.run(
                    [sys.executable, str(ROOT / "_build" / "inplace.py"), f"{tmp}/build"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                src = Path(made.stdout.strip())
            print(f"== {build} build ({src}) ==", flush=True)
            out = Path(tmp) / f"{build}.json"
            env = {**os.environ, "PYTHONPATH": str(src)}
            subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], env=env, check=True)
            results[build] = json.loads(out.read_text())
            print()
    return results


def print_build_ratios(results: dict[str, dict]) -> None:
    """Compiled against pure, where both ran: simulated requests per CPU-second, decisions, the cluster run."""
    pure, fast = results["pure"], results["compiled"]
    print("compiled vs pure (same sitting):")
    for section in ("simulator", "at_knee"):
        for a, b in zip(pure.get(section, []), fast.get(section, []), strict=True):
            rate_a, rate_b = a["requests"] / a["cpu_s"], b["requests"] / b["cpu_s"]
            print(
                f"  {a['workload']:18s} {a['policy']:14s} {rate_a:8.0f} -> {rate_b:8.0f} req/cpu-s"
                f"  {rate_b / rate_a:5.2f}x"
            )
    for a, b in zip(pure.get("decisions", []), fast.get("decisions", []), strict=True):
        print(
            f"  decision at {a['running']:4d} running, {a['policy']:14s} median {a['median_us']:7.1f} -> "
            f"{b['median_us']:7.1f} us  {a['median_us'] / b['median_us']:5.2f}x"
        )
    if "cluster" in pure and "cluster" in fast:
        a, b = pure["cluster"]["cpu_s"], fast["cluster"]["cpu_s"]
        print(f"  {pure['cluster']['nodes']}-node cluster run: {a:.1f} -> {b:.1f} s CPU  {a / b:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--nodes", type=int, default=64, help="cluster size for the one-hour cluster run")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--builds", help=f"comma-separated builds of {', '.join(BUILDS)}: each in turn, then ratios")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not only <= set(SECTIONS):
        ap.error(f"--only takes sections of {', '.join(SECTIONS)}, got {args.only!r}")
    if args.builds:
        builds = args.builds.split(",")
        if not set(builds) <= set(BUILDS):
            ap.error(f"--builds takes {', '.join(BUILDS)}, got {args.builds!r}")
        argv = [a for a in sys.argv[1:] if not a.startswith("--builds") and a != args.builds]
        if "--json" in argv:
            del argv[argv.index("--json") : argv.index("--json") + 2]
        results = run_builds(builds, argv)
        if set(results) == set(BUILDS):
            print_build_ratios(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    out: dict = {"build": this_build()}
    print(f"build: {out['build']}")
    if "recorded" in only:
        out["simulator"] = bench_simulator(args.requests, args.repeats)
        print("req/s*: the workload's arrival rate")
        print_sim(out["simulator"])
    if "knee" in only:
        out["at_knee"] = bench_simulator(args.requests, args.repeats, at_knee=True)
        if out["at_knee"]:
            print()
            print_sim(out["at_knee"])
        else:
            print(f"\nknee runs skipped: they need {EVALUATION}")
    if "decisions" in only:
        dec = out["decisions"] = bench_decisions([64, 256, 1024], args.calls)
        head = ("running", "policy", "mean us", "median us", "p99 us", "mean vs vllm", "median vs vllm")
        print("\n{:>7s} {:14s} {:>9s} {:>9s} {:>9s} {:>13s} {:>15s}".format(*head))
        for r in dec:
            base = next(b for b in dec if b["running"] == r["running"] and b["policy"] == "vllm")
            print(
                f"{r['running']:7d} {r['policy']:14s} {r['mean_us']:9.1f} {r['median_us']:9.1f} {r['p99_us']:9.1f} "
                f"{r['mean_us'] / base['mean_us']:12.2f}x {r['median_us'] / base['median_us']:14.2f}x"
            )
    if "cluster" in only:
        cluster = out["cluster"] = bench_cluster(args.nodes)
        print(
            f"\ncluster: {cluster['nodes']} nodes, {cluster['requests']} requests over {cluster['sim_s']:.0f} "
            f"simulated s (PAB, 0.5 s reports): {cluster['wall_s']:.1f} s wall, {cluster['cpu_s']:.1f} s CPU"
        )
    if "startup" in only:
        out["cli_startup"] = bench_startup()
        out["cli_startup_s"] = out["cli_startup"]["simulate --help"]
        times = ", ".join(f"{command} {wall:.2f} s" for command, wall in out["cli_startup"].items())
        print(f"CLI start-up (best of 5; target < 0.3 s): {times}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
