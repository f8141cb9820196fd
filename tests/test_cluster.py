import pytest

from fairbatching.cluster import ROUTERS, ClusterConfig, NodeReport, make_router, simulate_cluster
from fairbatching.cluster.simulator import NodeSpec, homogeneous
from fairbatching.core import SLO
from fairbatching.core.request import RequestStatus
from fairbatching.errors import ConfigError
from fairbatching.metrics import summarize
from fairbatching.policies.admission import AdmissionBudget
from fairbatching.workloads import default_workload

SLO_ = SLO(2.0, 0.1)


def ids(result):
    return sorted(r.request_id for r in result.requests)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_request_is_accounted_once_under_every_router(router):
    w = default_workload(600, 60.0)
    res = simulate_cluster(w, ClusterConfig(homogeneous(3, "fairbatching"), SLO_, router=router))
    assert ids(res) == sorted(s.request_id for s in w.requests)
    assert all(r.status is RequestStatus.FINISHED for r in res.requests)
    assert sum(p["finished"] for p in res.per_node) == 600
    assert min(p["finished"] for p in res.per_node) > 100  # every router spreads the load


def test_heterogeneous_nodes_and_policies():
    nodes = (NodeSpec("fairbatching"), NodeSpec("sarathi", "llama-3-8b-h100-analytic"), NodeSpec("vllm"))
    res = simulate_cluster(default_workload(300, 30.0), ClusterConfig(nodes, SLO_, router="least-outstanding"))
    assert len(res.requests) == 300 and [p["policy"] for p in res.per_node] == ["fairbatching", "sarathi", "vllm"]


@pytest.mark.parametrize("on_failure", ["fail", "retry"])
def test_node_failure_is_noticed_within_a_report_interval_and_loses_nothing(on_failure, monkeypatch):
    from fairbatching.cluster import simulator

    sent_to_the_dead = []  # (when): a request routed to the failed node, failed (fail) or sent again (retry)
    lost = simulator._Cluster.lost
    monkeypatch.setattr(
        simulator._Cluster, "lost", lambda self, spec, t, why: sent_to_the_dead.append(t) or lost(self, spec, t, why)
    )
    w = default_workload(800, 40.0)
    cfg = ClusterConfig(
        homogeneous(3, "fairbatching"),
        SLO_,
        router="round-robin",
        report_interval=0.5,
        failures=((1, 5.0),),
        on_failure=on_failure,
    )
    res = simulate_cluster(w, cfg)
    assert ids(res) == sorted(s.request_id for s in w.requests)
    by_status = {}
    for r in res.requests:
        by_status.setdefault(r.status, []).append(r)
    failed = by_status.get(RequestStatus.FAILED, [])
    assert all("node 1" in r.finish_reason for r in failed)
    # Sent to the dead node only until its last report goes stale: later arrivals avoid it.
    assert not [r for r in failed if r.arrival > 5.0 + cfg.staleness + 1e-9]
    assert sent_to_the_dead and max(sent_to_the_dead) <= 5.0 + cfg.staleness + 1e-9
    if on_failure == "retry":
        assert all(r.token_times for r in failed)  # only requests that had streamed tokens fail
        assert len(by_status[RequestStatus.FINISHED]) > len(w) - 60
    else:
        assert failed
    assert res.per_node[1]["alive"] is False


def test_pab_admission_control_rejects_with_a_reason_and_defer_waits():
    w = default_workload(600, 120.0)  # far past what one node can take
    one = homogeneous(1, "fairbatching")
    reject = simulate_cluster(w, ClusterConfig(one, SLO_, router="pab", admission="reject"))
    rejected = [r for r in reject.requests if r.status is RequestStatus.REJECTED]
    assert rejected and all("admission control" in r.finish_reason for r in rejected)
    assert len(reject.requests) == 600
    served = [r for r in reject.requests if r.status is RequestStatus.FINISHED]
    plain = simulate_cluster(w, ClusterConfig(one, SLO_, router="pab"))
    admitted_ok = summarize("x", "w", served, reject.end_time, 0, 0).ttft_attainment
    assert admitted_ok > summarize("x", "w", plain.requests, plain.end_time, 0, 0).ttft_attainment
    defer = simulate_cluster(w, ClusterConfig(one, SLO_, router="pab", admission="defer"))
    assert len(defer.requests) == 600
    assert sum(r.status is RequestStatus.FINISHED for r in defer.requests) >= len(served)


def test_under_cluster_admission_the_nodes_refuse_what_a_late_report_let_through():
    """Reports a second late let the router send two nodes more than they can serve in time; the nodes refuse
    those on their own current budget, so no answered request's first token comes past its TTFT by more than a
    step (the router alone, trusting the late reports, answered one 0.8 s late)."""
    w = default_workload(600, 120.0)
    cfg = ClusterConfig(homogeneous(2, "fairbatching"), SLO_, router="pab", admission="reject", report_delay=1.0)
    res = simulate_cluster(w, cfg)
    refused = [r.finish_reason for r in res.requests if r.status is RequestStatus.REJECTED]
    assert any(reason.startswith("admission control: prefill budget") for reason in refused)  # a node's refusal
    served = [r for r in res.requests if r.status is RequestStatus.FINISHED]
    assert len(served) + len(refused) == 600
    assert max(r.token_times[0] - r.arrival for r in served) <= SLO_.ttft + 0.25


def test_stale_budgets_shrink_then_the_node_is_excluded():
    from fairbatching.cluster.simulator import _Cluster

    cfg = ClusterConfig(homogeneous(2, "fairbatching"), SLO_, router="pab", report_interval=1.0, report_delay=0.0)
    c = _Cluster(cfg)
    b = AdmissionBudget(1.0, 1000, 0.1, 0.0, 10, 2.0)
    c.reports = [[NodeReport(0, 0.0, 0, 0, 0, b)], [NodeReport(1, 0.0, 0, 0, 0, b)]]
    assert [r.budget.tokens for r in c.visible(0.5)] == [1000, 1000]  # fresh
    assert [r.budget.tokens for r in c.visible(1.5)] == [500, 500]  # one report missed: halfway to zero
    assert c.visible(2.5) == []  # past the staleness limit: treated as down


def test_bad_cluster_configs():
    with pytest.raises(ConfigError, match="unknown router"):
        make_router("random")
    with pytest.raises(ConfigError, match="needs the pab router"):
        make_router("round-robin", admission=True)
    with pytest.raises(ConfigError, match="failure names node 5"):
        ClusterConfig(homogeneous(2, "vllm"), SLO_, failures=((5, 1.0),))


def test_cluster_capacity_search_and_cli(tmp_path):
    from test_cli import cli

    from fairbatching.evaluation import Sweeper, find_capacity
    from fairbatching.runs import ClusterShape, RunSpec

    base = RunSpec("fairbatching", "default", 1.0, num_requests=200, cluster=ClusterShape(nodes=2))
    res = find_capacity(base, Sweeper(tmp_path / "c", workers=1), seeds=1, start_qps=20, tolerance=0.2)
    at = {p.qps: p.attainment for p in res.curve}
    assert res.policy == "fairbatching+pab" and at[res.bracket[0]] >= 0.9 > at[res.bracket[1]]
    out = cli(
        "cluster",
        "--nodes",
        "2",
        "-n",
        "200",
        "--qps",
        "30",
        "--pairs",
        "sarathi:round-robin,fairbatching:pab:reject",
        "--cache",
        str(tmp_path / "c"),
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    assert "sarathi+round-robin" in out.stdout and "fairbatching+pab+reject" in out.stdout
    bad = cli("cluster", "--pairs", "fairbatching:round-robin:reject")
    assert bad.returncode == 2 and "needs the pab router" in bad.stderr


@pytest.mark.parametrize("on_failure", ["fail", "retry"])
def test_a_failed_node_s_deferred_requests_end_once(on_failure, tmp_path, monkeypatch):
    """A node that fails holding requests its admission deferred: each ends once, failed or sent again."""
    import json
    from importlib import resources

    from fairbatching.cluster import simulator
    from fairbatching.workloads.spec import RequestSpec, Workload

    doc = json.loads((resources.files("fairbatching.costmodel") / "profiles/llama-3-8b-h100-engine.json").read_text())
    doc["kv"]["num_blocks"] = 2000
    (small := tmp_path / "small-kv.json").write_text(json.dumps(doc))
    deferred_at_failure = []
    fail = simulator._Cluster.fail
    monkeypatch.setattr(
        simulator._Cluster,
        "fail",
        lambda self, i, t: deferred_at_failure.append(len(self.nodes[i].deferred)) or fail(self, i, t),
    )
    arrivals = (0.00052, 0.00185, 0.00185, 0.00185, 0.00202, 0.00202, 0.00268)
    shapes = ((34, 49), (1189, 20), (859, 20), (628, 33), (1760, 9), (1161, 44), (1807, 25))
    w = Workload(
        "w", tuple(RequestSpec(f"r{i}", a, p, o) for i, (a, (p, o)) in enumerate(zip(arrivals, shapes, strict=True)))
    )
    cfg = ClusterConfig(
        (NodeSpec("vllm", str(small)), NodeSpec("vllm", str(small))),
        SLO(0.2, 0.02),
        router="pab-affinity",
        admission="defer",
        report_interval=0.05,
        failures=((0, 0.00366),),
        on_failure=on_failure,
    )
    res = simulate_cluster(w, cfg)
    assert deferred_at_failure == [1]
    assert ids(res) == sorted(s.request_id for s in w.requests)
    assert summarize("vllm", "w", res.requests, res.end_time, res.busy_time, 0).failed == sum(
        r.status is RequestStatus.FAILED for r in res.requests
    )
