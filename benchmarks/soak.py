"""Soak (run on demand, not in CI: ``python benchmarks/soak.py``).

The whole one-hour Azure conversation trace (19,366 requests) at 1.5x a node's capacity through every policy
on one node, then at 1.5x four nodes' capacity through the cluster (PAB router, with and without admission
control, and vLLM + round-robin). Checks that every request is accounted for exactly once and that memory
stays flat: the process's resident memory after each run (garbage collected) must not grow from run to run,
so nothing is kept alive between runs, and each run's peak is printed beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fairbatching.cluster import ClusterConfig, simulate_cluster
from fairbatching.cluster.simulator import homogeneous
from fairbatching.core import SLO
from fairbatching.costmodel import load_profile
from fairbatching.policies import POLICIES
from fairbatching.runs import Experiment
from fairbatching.workloads import load_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
# Single-node capacity on this trace at TTFT 2 s / TPOT 100 ms, default profile (README, "Single-node evaluation").
NODE_CAPACITY = 17.64


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def check_accounted(ids: list[str], expected: int) -> None:
    dup = [k for k, v in Counter(ids).items() if v > 1]
    if len(ids) != expected or dup:
        raise SystemExit(f"lost or duplicated requests: {len(ids)} of {expected}, duplicated {dup[:5]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--load", type=float, default=1.5, help="multiple of capacity")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--growth-mib", type=float, default=64.0, help="allowed resident growth from run to run")
    args = ap.parse_args()
    if not args.trace.is_file():
        raise SystemExit(f"{args.trace}: missing (the shared traces folder is not beside this checkout)")
    hour = load_trace(args.trace)
    slo = SLO(2.0, 0.1)
    runs: list[tuple[str, Callable[[], list[str]]]] = []
    node_w = hour.rescaled(args.load * NODE_CAPACITY)
    exp = Experiment(node_w, load_profile(), slo)
    for policy in POLICIES:
        runs.append((f"node {policy}", lambda p=policy: [r.request_id for r in exp.run(p).requests]))
    cluster_w = hour.rescaled(args.load * NODE_CAPACITY * args.nodes)
    for policy, router, admission in (
        ("vllm", "round-robin", "none"),
        ("fairbatching", "pab", "none"),
        ("fairbatching", "pab", "reject"),
    ):
        cfg = ClusterConfig(homogeneous(args.nodes, policy), slo, router=router, admission=admission)
        label = f"cluster {policy}+{router}" + (f"+{admission}" if admission != "none" else "")
        runs.append((label, lambda c=cfg: [r.request_id for r in simulate_cluster(cluster_w, c).requests]))

    print(f"{len(hour)} requests; node runs at {node_w.qps:.1f} req/s, cluster runs at {cluster_w.qps:.1f} req/s")
    print(f"{'run':40s} {'wall s':>7s} {'RSS after MiB':>14s}")
    gc.collect()
    baseline = rss_mib()
    after = []
    for label, run in runs:
        t0 = time.perf_counter()
        ids = run()
        wall = time.perf_counter() - t0
        check_accounted(ids, len(hour))
        del ids
        gc.collect()
        after.append(rss_mib())
        print(f"{label:40s} {wall:7.1f} {after[-1]:14.1f}")
    growth = max(after) - after[0]
    print(
        f"resident before the runs {baseline:.1f} MiB; after the first {after[0]:.1f}, max after any {max(after):.1f}"
    )
    if growth > args.growth_mib:
        raise SystemExit(f"memory grew {growth:.1f} MiB across runs (allowed {args.growth_mib})")
    print(f"every request accounted for once in all {len(runs)} runs; memory flat (+{growth:.1f} MiB across runs)")


if __name__ == "__main__":
    main()
