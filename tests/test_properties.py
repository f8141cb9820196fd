"""Property-based tests: random workloads, SLO mixes, profiles and policy options through every policy on the
node simulator and through the cluster simulator.

Every run must account for each request exactly once, never hold more KV blocks than the node has (node runs;
the cluster's nodes are held to it by the node tests), generate
exactly the output it was asked for (finished) or less (ended early, with a reason), give finite metrics,
and give the same result twice. CI runs a short profile; ``FAIRBATCHING_PROPERTY_EXAMPLES=2500`` runs the
long one (4 policies + the cluster: 12,500 cases), e.g. with ``--hypothesis-show-statistics``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fairbatching.cluster import ClusterConfig, simulate_cluster
from fairbatching.cluster.routers import ROUTERS
from fairbatching.cluster.simulator import NodeSpec
from fairbatching.config import POLICY_CONFIGS, options_of
from fairbatching.core import SLO, KVCacheConfig
from fairbatching.core.request import RequestStatus
from fairbatching.costmodel import CostModel, CostParams, Profile, analytic_profile
from fairbatching.errors import ConfigError
from fairbatching.metrics.summary import summarize
from fairbatching.policies import POLICIES, make_policy
from fairbatching.serving.simulator import NodeConfig, simulate
from fairbatching.validate import check_policy_options
from fairbatching.workloads.spec import RequestSpec, Workload

EXAMPLES = int(os.environ.get("FAIRBATCHING_PROPERTY_EXAMPLES", "12"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

slos = st.builds(SLO, ttft=st.floats(0.05, 20.0), tpot=st.floats(0.02, 0.5))
cost_params = st.builds(
    CostParams,
    t_fixed=st.floats(0.0, 2e-3),
    c_seq=st.floats(0.0, 2e-5),
    t_weights=st.floats(1e-3, 1e-2),
    c_kv=st.floats(0.0, 1e-7),
    c_tok=st.floats(1e-6, 1e-4),
    c_attn=st.floats(0.0, 2e-9),
    p=st.sampled_from([1.0, 2.0, 4.0]),
    t_mixed=st.floats(0.0, 2e-3),
)
kv_configs = st.builds(KVCacheConfig, num_blocks=st.integers(4, 3000), block_size=st.sampled_from([16, 32]))


@st.composite
def workloads(draw: st.DrawFn, max_requests: int = 30) -> Workload:
    n = draw(st.integers(1, max_requests))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.001]) | st.floats(0.0, 3.0), min_size=n, max_size=n))
    classes = draw(st.lists(slos, max_size=3))
    reqs, t = [], 0.0
    for i, gap in enumerate(gaps):
        t += gap
        slo = draw(st.sampled_from(classes)) if classes and draw(st.booleans()) else None
        reqs.append(RequestSpec(f"r{i}", t, draw(st.integers(1, 4096)), draw(st.integers(1, 300)), slo))
    return Workload("prop", tuple(reqs))


# Values each option may take in a test: in its declared range (``fairbatching.config``), sized so a run stays fast.
OPTION_VALUES = {
    "max_num_batched_tokens": st.integers(16, 8192),
    "token_budget": st.integers(16, 8192),
    "max_num_seqs": st.integers(1, 256),
    "max_batch_time": st.none() | st.floats(0.005, 1.0),
    "min_chunk": st.integers(1, 512),
    "edf_window": st.integers(1, 256),
    "urgency_margin": st.floats(0.0, 4.0),
    "decode_grace": st.floats(0.0, 2.0),
    "mixed_amortization": st.floats(0.0, 20.0),
    "slack_carry": st.floats(0.0, 1.0),
    "min_budget_fraction": st.floats(0.0, 1.0),
    "kv_reserve_fraction": st.floats(0.0, 0.5),
    "kv_high_watermark": st.floats(0.0, 1.0),
    "yield_reserve": st.floats(0.0, 4.0),
    "late_last": st.booleans(),
    "late_age_limit": st.none() | st.floats(0.5, 4.0),
    "late_share": st.floats(0.05, 1.0),
    "queue_margin": st.none() | st.floats(0.0, 2.0),
}


@st.composite
def policy_options(draw: st.DrawFn, policy: str) -> dict:
    names = sorted(set(options_of(POLICY_CONFIGS[policy])) & set(OPTION_VALUES))
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    options = {k: draw(OPTION_VALUES[k]) for k in chosen}
    declared = options_of(POLICY_CONFIGS[policy])
    if "min_chunk" in declared:  # a chunk floor above the step's token cap is refused: draw one under it
        cap = options.get("max_num_batched_tokens", declared["max_num_batched_tokens"].default)
        if options.get("min_chunk", declared["min_chunk"].default) > cap:
            options["min_chunk"] = draw(st.integers(1, cap))
    check_policy_options(policy, options)  # the generator only makes what the CLI accepts
    return options


def check_accounting(workload: Workload, requests: list, kv_blocks: int | None, kv_log: list[int]) -> None:
    ids = sorted(r.request_id for r in requests)
    assert ids == sorted(s.request_id for s in workload.requests), "a request was lost or counted twice"
    targets = {s.request_id: s for s in workload.requests}
    for r in requests:
        spec = targets[r.request_id]
        n = len(r.token_times)
        assert r.num_blocks == 0, f"{r.request_id} still holds {r.num_blocks} KV blocks after the run"
        assert r.status is not RequestStatus.WAITING and r.status is not RequestStatus.RUNNING
        if r.status is RequestStatus.FINISHED:
            assert n == spec.output_len and r.num_tokens == spec.prompt_len + spec.output_len
        else:
            assert n < spec.output_len and r.finish_reason, f"{r.request_id} ended {r.status} without a reason"
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:], strict=False))
        assert not r.token_times or r.token_times[0] >= r.arrival
    if kv_blocks is not None:
        assert max(kv_log, default=0) <= kv_blocks


def check_summary(summary) -> None:
    d = summary.to_dict()
    for key in ("ttft_attainment", "tpot_attainment", "slo_attainment", "envelope_attainment", "gpu_busy"):
        assert 0.0 <= d[key] <= 1.0 + 1e-9, (key, d[key])
    for key in ("duration_s", "goodput_rps", "throughput_tok_s"):
        assert math.isfinite(d[key]) and d[key] >= 0, (key, d[key])
    for m in summary.per_request:
        if m.status == "finished":
            assert all(math.isfinite(v) and v >= 0 for v in (m.ttft, m.tpot, m.e2e, m.max_tbt)), m
    if summary.finished:
        assert all(math.isfinite(v) for v in d["ttft"].values()), d["ttft"]


def _run_node(policy, params, kv, slo, options, workload, admission, timeout):
    cost = CostModel(params)
    pol = make_policy(policy, cost, tpot_slo=slo.tpot, **options)
    cfg = NodeConfig(default_slo=slo, kv=kv, queue_timeout=timeout, admission=admission)
    return simulate(pol, cost, workload, cfg)


@pytest.mark.parametrize("policy", list(POLICIES))
@SETTINGS
@given(
    data=st.data(),
    params=cost_params,
    kv=kv_configs,
    slo=slos,
    workload=workloads(),
    admission=st.sampled_from(["none", "none", "reject", "defer"]),
    timeout=st.none() | st.floats(0.2, 30.0),
)
def test_node_simulation_invariants(policy, data, params, kv, slo, workload, admission, timeout):
    options = data.draw(policy_options(policy))
    try:
        res = _run_node(policy, params, kv, slo, options, workload, admission, timeout)
    except ConfigError:
        assume(False)  # e.g. a TPOT no token budget can meet on this profile: refused up front, not a bug
    check_accounting(workload, res.requests, kv.num_blocks, res.log.kv_used)
    assert res.busy_time <= res.end_time - workload.requests[0].arrival + 1e-9
    summary = summarize(policy, workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
    check_summary(summary)
    again = _run_node(policy, params, kv, slo, options, workload, admission, timeout)
    again_summary = summarize(policy, workload.name, again.requests, again.end_time, again.busy_time, again.preemptions)
    assert json.dumps(summary.to_dict(with_requests=True)) == json.dumps(again_summary.to_dict(with_requests=True))


@pytest.fixture(scope="module")
def small_kv_profiles(tmp_path_factory) -> list[str]:
    """Cluster nodes load profiles by name or path: the analytic model with small, medium and large KV."""
    folder = tmp_path_factory.mktemp("profiles")
    paths = []
    for blocks in (64, 600, 20_000):
        prof = replace(analytic_profile(), name=f"kv{blocks}", kv=KVCacheConfig(blocks, 16))
        path = folder / f"kv{blocks}.json"
        Profile.save(prof, path)
        paths.append(str(path))
    return paths


@SETTINGS
@given(
    data=st.data(),
    workload=workloads(max_requests=40),
    slo=slos,
    nodes=st.integers(1, 4),
    report_interval=st.floats(0.05, 2.0),
    report_delay=st.floats(0.0, 1.0),
    on_failure=st.sampled_from(["fail", "retry"]),
    seed=st.integers(0, 3),
)
def test_cluster_invariants(
    small_kv_profiles, data, workload, slo, nodes, report_interval, report_delay, on_failure, seed
):
    policy = data.draw(st.sampled_from(list(POLICIES)))
    profile = data.draw(st.sampled_from(small_kv_profiles))
    router = data.draw(st.sampled_from(list(ROUTERS)))
    admission = data.draw(st.sampled_from(["none", "reject", "defer"])) if router == "pab" else "none"
    failures = data.draw(st.lists(st.tuples(st.integers(0, nodes - 1), st.floats(0.0, 20.0)), max_size=nodes))
    cfg = ClusterConfig(
        tuple(NodeSpec(policy, profile) for _ in range(nodes)),
        slo,
        router=router,
        admission=admission,
        report_interval=report_interval,
        report_delay=report_delay,
        failures=tuple(failures),
        on_failure=on_failure,
        seed=seed,
    )
    try:
        res = simulate_cluster(workload, cfg)
    except ConfigError:
        assume(False)
    check_accounting(workload, res.requests, None, [])
    summary = summarize("cluster", workload.name, res.requests, res.end_time, res.busy_time / nodes, res.preemptions)
    check_summary(summary)
    again = simulate_cluster(workload, cfg)
    assert [(r.request_id, r.status, r.token_times) for r in res.requests] == [
        (r.request_id, r.status, r.token_times) for r in again.requests
    ]
