"""Why a router reaches the capacity it does on multi-turn chat with prefix caching (issue 29), at one load.

Per router: SLO attainment, prefix hit rate, requests and busy time per node, and how often a conversation's
turn went to a different node than its previous turn (``moved``: its history is not cached there).
Run from the repository root (one process):

    PYTHONPATH=src python benchmarks/affinity_study.py --qps 88 --seed 0 -n 4000
"""

import argparse
import json
from dataclasses import replace

from fairbatching.cluster import simulator
from fairbatching.cluster.simulator import _Cluster
from fairbatching.costmodel.profile import Profile
from fairbatching.metrics.summary import prefix_hit_rate, summarize
from fairbatching.runs import ClusterShape, RunSpec, _cluster_config
from fairbatching.workloads.families import family


def study(router: str, policy: str, qps: float, seed: int, n: int) -> dict:
    spec = RunSpec(policy, "multi-turn", qps, seed, n, 2.0, 0.1, cluster=ClusterShape(4, router), prefix_caching=True)
    w = family("multi-turn").build(qps, seed, n)
    cluster = _Cluster(_cluster_config(spec))
    peak = [0] * len(cluster.nodes)
    publish = cluster.publish

    def watched(t: float) -> None:
        publish(t)
        peak[:] = [max(p, len(n.running)) for p, n in zip(peak, cluster.nodes, strict=True)]

    cluster.publish = watched
    res = cluster.run(w, None)
    where = {r.request_id: i for i, node in enumerate(cluster.nodes) for r in node.done}
    last: dict[int, int] = {}
    moved = turns = 0
    for s in sorted(w.requests, key=lambda s: s.arrival):
        conv, node = s.prefix[1][0], where.get(s.request_id)
        if conv in last and node is not None:
            turns += 1
            moved += node != last[conv]
        if node is not None:
            last[conv] = node
    m = summarize(spec.label, w.name, res.requests, res.end_time, res.busy_time / 4, res.preemptions, True)
    return {
        "stack": spec.label,
        "qps": qps,
        "seed": seed,
        "slo_attainment": round(m.slo_attainment, 4),
        "ttft_attainment": round(m.ttft_attainment, 4),
        "hit_rate": round(prefix_hit_rate(res.requests), 4),
        "moved_turns": round(moved / max(turns, 1), 4),
        "per_node_requests": [p["finished"] for p in res.per_node],
        "per_node_busy_s": [round(p["busy_s"], 1) for p in res.per_node],
        "per_node_peak_running": peak,
    }


def set_max_num_seqs(slots: int) -> None:
    """A diagnostic: every cluster node's policy with ``slots`` sequence slots instead of its default (cluster
    runs take no policy options). In-process only: a sweeper's worker processes keep the default."""
    make = simulator.make_policy
    simulator.make_policy = lambda name, cost, tpot_slo=None: make(name, cost, tpot_slo, max_num_seqs=slots)


def set_kv_scale(scale: float) -> None:
    """A diagnostic: every cluster node's KV cache (and so its prefix cache, and the router's index of it)
    ``scale`` times its profile's. In-process only, as ``set_max_num_seqs``."""
    load = simulator.load_profile

    def scaled(name: str) -> Profile:
        prof = load(name)
        return replace(prof, kv=replace(prof.kv, num_blocks=int(prof.kv.num_blocks * scale)))

    simulator.load_profile = scaled


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--qps", type=float, default=88.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--stacks", default="fairbatching:pab-affinity,fairbatching:prefix-affinity,fairbatching:pab")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="a diagnostic: the nodes' sequence slots")
    ap.add_argument("--kv-scale", type=float, default=None, help="a diagnostic: every node's KV cache x this")
    a = ap.parse_args()
    if a.max_num_seqs:
        set_max_num_seqs(a.max_num_seqs)
    if a.kv_scale:
        set_kv_scale(a.kv_scale)
    for item in a.stacks.split(","):
        policy, router = item.split(":")
        print(json.dumps(study(router, policy, a.qps, a.seed, a.n)), flush=True)
