"""Cluster simulation at scale (run on demand: ``python benchmarks/bench_cluster.py``).

64 fairbatching nodes behind the PAB router (0.5 s reports) on (a) the whole one-hour Azure conversation
trace (19,366 requests) at its recorded rate and (b) the same requests compressed to 768 req/s (12 per
node, so every node is busy).
Prints wall time and simulated requests per wall-second, with round-robin measured in the same run as
the baseline (same nodes, no budget reports to compute). Issue 20's target: the one hour on 64 nodes (PAB) under 20 s.
"""

from __future__ import annotations

import argparse
import time

from fairbatching.cluster import ClusterConfig, simulate_cluster
from fairbatching.cluster.simulator import homogeneous
from fairbatching.core import SLO
from fairbatching.metrics import summarize
from fairbatching.workloads import load_trace
from fairbatching.workloads.bundled import resolve_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=64)
    args = ap.parse_args()
    hour = load_trace(resolve_trace("azure-conv"))  # bundled with the package
    loaded = hour.rescaled(12.0 * args.nodes)
    slo = SLO(2.0, 0.1)
    print(f"{'workload':22s} {'router':12s} {'requests':>9s} {'sim s':>8s} {'wall s':>8s} {'req/s':>8s} {'SLO ok':>7s}")
    for label, w in (("one hour, native rate", hour), (f"loaded, {loaded.qps:.0f} req/s", loaded)):
        for router in ("round-robin", "pab"):
            cfg = ClusterConfig(homogeneous(args.nodes, "fairbatching"), slo, router=router, report_interval=0.5)
            t0 = time.perf_counter()
            res = simulate_cluster(w, cfg)
            wall = time.perf_counter() - t0
            s = summarize(router, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
            assert len(res.requests) == len(w)
            print(
                f"{label:22s} {router:12s} {len(w):9d} {w.duration:8.0f} {wall:8.1f} {len(w) / wall:8.0f} "
                f"{s.slo_attainment:7.1%}"
            )


if __name__ == "__main__":
    main()
