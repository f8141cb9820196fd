"""Prints one line per simulation run: its iterations and a digest of every request's outcome and token
times. tests/test_compiled.py runs it against the pure-Python source and the mypyc build: equal output
means the compiled hot path computed the same bits."""

import hashlib
import sys

from fairbatching.cluster import ClusterConfig, simulate_cluster
from fairbatching.cluster.simulator import homogeneous
from fairbatching.core import SLO
from fairbatching.costmodel import load_profile
from fairbatching.policies import POLICIES, make_policy
from fairbatching.serving import NodeConfig, simulate
from fairbatching.serving.pricing import StepError, pricing_model
from fairbatching.workloads import load_trace
from fairbatching.workloads.bundled import resolve_trace


def digest(requests) -> str:
    h = hashlib.sha256()
    for r in sorted(requests, key=lambda r: r.request_id):
        h.update(repr((r.request_id, r.status.value, r.finish_reason, r.num_preemptions, r.token_times)).encode())
    return h.hexdigest()[:16]


def main(n: int) -> None:
    prof = load_profile()
    cost = prof.cost_model()
    slo = SLO(2.0, 0.1)
    for name, qps in (("azure-conv", 18.0), ("azure-code", 6.0)):
        w = load_trace(resolve_trace(name)).head(n).rescaled(qps)
        for policy in POLICIES:
            for admission in ("none", "defer") if policy == "fairbatching" else ("none",):
                config = NodeConfig(default_slo=slo, kv=prof.kv, admission=admission)
                res = simulate(make_policy(policy, cost, tpot_slo=slo.tpot), cost, w, config)
                print(name, policy, admission, res.iterations, res.preemptions, digest(res.requests))
    # Steps that cost more than planned, with noise: the adaptive model and late paths at work.
    pricer = pricing_model(cost, StepError(scale=1.15, noise=0.05, overhead=0.002, seed=3))
    w = load_trace(resolve_trace("azure-conv")).head(n).rescaled(20.0)
    res = simulate(make_policy("fairbatching", cost, tpot_slo=slo.tpot), pricer, w, NodeConfig(slo, prof.kv))
    print("model error", res.iterations, digest(res.requests))
    w = load_trace(resolve_trace("azure-conv")).head(n).rescaled(60.0)
    res = simulate_cluster(w, ClusterConfig(homogeneous(4, "fairbatching"), slo, router="pab", report_interval=0.5))
    print("cluster", digest(res.requests))


if __name__ == "__main__":
    main(int(sys.argv[1]))
