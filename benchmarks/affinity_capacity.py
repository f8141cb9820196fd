"""Cluster capacity of node-policy + router stacks on multi-turn with prefix caching, on a chosen seed (trace
window), so a router tuned on one window can be validated on another (the `cluster` command runs seeds from 0).
One process. Run from the repository root:

    PYTHONPATH=src python benchmarks/affinity_capacity.py --seed 1 -n 4000 \
        --out results/prefix-caching/cluster-multi-turn-seed1.json
"""

import argparse
import json
import sys
from dataclasses import asdict

from affinity_study import set_kv_scale, set_max_num_seqs

from fairbatching.errors import ConfigError
from fairbatching.evaluation.capacity import find_capacity
from fairbatching.evaluation.cluster import cluster_stacks
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.runs import ClusterShape, RunSpec

STACKS = (
    "fairbatching:pab-affinity,fairbatching:pab,fairbatching:prefix-affinity,fairbatching:least-outstanding,"
    "fairbatching:round-robin,vllm:prefix-affinity"
)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--qps", type=float, default=60.0, help="where each search starts")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--stacks", default=STACKS, help="policy:router[:admission], comma-separated")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="every node's sequence slots (a diagnostic)")
    ap.add_argument("--kv-scale", type=float, default=None, help="every node's KV cache x this (a diagnostic)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.max_num_seqs:
        set_max_num_seqs(a.max_num_seqs)
    if a.kv_scale:
        set_kv_scale(a.kv_scale)
    base = RunSpec(
        "fairbatching", "multi-turn", a.qps, a.seed, a.n, 2.0, 0.1, cluster=ClusterShape(4), prefix_caching=True
    )
    try:
        stacks = cluster_stacks(a.stacks, base)
    except ConfigError as exc:
        print(f"error: --stacks: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for spec in stacks:
        res = find_capacity(spec, Sweeper(None, 1), 0.9, 1, a.qps, a.tolerance, first_seed=a.seed)
        rows.append(
            {
                "stack": spec.label,
                "seed": a.seed,
                **({"max_num_seqs": a.max_num_seqs} if a.max_num_seqs else {}),
                **({"kv_scale": a.kv_scale} if a.kv_scale else {}),
                "capacity_qps": res.capacity_qps,
                "bracket": res.bracket,
                "curve": [asdict(p) for p in res.curve],
            }
        )
        print(json.dumps({k: rows[-1][k] for k in ("stack", "seed", "capacity_qps", "bracket")}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
