"""The engine cluster driver (one engine process per device behind the routing core), on CPU engines."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the engine cluster needs the [gpu] extra (torch)")

from fairbatching.cluster.simulator import ClusterConfig, homogeneous  # noqa: E402
from fairbatching.core.request import SLO, RequestStatus  # noqa: E402
from fairbatching.engine.cluster import EngineCluster, EngineSpec, ReplicaError  # noqa: E402
from fairbatching.errors import ConfigError  # noqa: E402
from fairbatching.workloads.spec import RequestSpec, Workload  # noqa: E402

CPU_ENGINE = EngineSpec("tiny", max_context=1024, num_blocks=200, device="cpu")


@pytest.fixture(scope="module")
def cluster():
    with EngineCluster(CPU_ENGINE, [None, None]) as c:
        yield c


def specs() -> tuple[RequestSpec, ...]:
    arrivals = tuple(RequestSpec(f"r{i}", 100.0 + 0.02 * i, 20 + 7 * i, 2 + i % 3) for i in range(16))
    return arrivals + (RequestSpec("too-long", 100.05, 2000, 4),)


@pytest.mark.parametrize(("router", "admission"), [("round-robin", "none"), ("pab", "reject")])
def test_every_request_ends_once_on_some_replica_with_its_tokens(cluster, router, admission):
    config = ClusterConfig(
        homogeneous(2, "fairbatching"), SLO(5.0, 1.0), router=router, admission=admission, report_interval=0.1
    )
    res = cluster.replay(Workload("w", specs()), config)
    by_id = {r.request_id: r for r in res.requests}
    assert sorted(by_id) == sorted(s.request_id for s in specs()) and len(res.requests) == len(by_id)
    assert by_id["too-long"].status is RequestStatus.REJECTED and by_id["too-long"].finish_reason
    for s in specs()[:-1]:
        r = by_id[s.request_id]
        # Times are relative to the first arrival (the trace's clock moved to zero).
        assert r.arrival == pytest.approx(s.arrival - 100.0)
        if r.status is RequestStatus.FINISHED:
            assert r.num_generated == s.output_len and r.token_times[0] >= r.arrival
        else:
            assert r.status is RequestStatus.REJECTED and "admission control" in r.finish_reason
    reached = [n["finished"] for n in res.per_node]  # what each replica ended, its own rejections included
    refused = [r for r in res.requests if "admission control" in (r.finish_reason or "")]
    assert sum(reached) == len(res.requests) - len(refused)
    if router == "round-robin":
        assert all(reached)


def conversations() -> tuple[RequestSpec, ...]:
    """Two conversations of four turns, 0.5 s apart: each turn's prompt extends the one before (one content
    segment per conversation), so a later turn can reuse every full block of the earlier prompt."""
    return tuple(
        RequestSpec(f"c{c}t{k}", 0.5 * k + 0.05 * c, 40 + 48 * k, 3, prefix=((100 + c, 40 + 48 * k),))
        for k in range(4)
        for c in range(2)
    )


@pytest.mark.parametrize("router", ["prefix-affinity", "pab-affinity"])
def test_prefix_caching_on_the_replicas_and_affinity_routing_reuse_each_conversations_blocks(cluster, router):
    config = ClusterConfig(
        homogeneous(2, "fairbatching"), SLO(5.0, 1.0), router=router, report_interval=0.5, prefix_caching=True
    )  # reports every 0.5 s: neither replica goes silent for the router on a loaded machine
    res = cluster.replay(Workload("w", conversations()), config)
    by_id = {r.request_id: r for r in res.requests}
    assert len(by_id) == len(res.requests) == 8
    assert all(r.status is RequestStatus.FINISHED and r.num_generated == 3 for r in by_id.values())
    later = [by_id[f"c{c}t{k}"].prefix_hit for c in range(2) for k in range(1, 4)]
    if router == "prefix-affinity":  # each turn follows its conversation and finds its earlier prompt cached
        assert later == [(40 + 48 * (k - 1)) // 16 * 16 for _ in range(2) for k in range(1, 4)]
    else:  # a node's budget, not only its cache, decides: some turns still land where their prefix is
        assert sum(later) > 0
    assert all(by_id[f"c{c}t0"].prefix_hit == 0 for c in range(2))


def test_a_replica_that_cannot_start_is_reported_with_its_error():
    with pytest.raises(ReplicaError, match="unknown model 'llama-9'"):
        EngineCluster(EngineSpec("llama-9", device="cpu", num_blocks=8), [None])


def test_a_replica_that_dies_mid_run_stops_the_replay_with_a_named_error():
    with pytest.raises(ReplicaError, match="replica 0 exited"), EngineCluster(CPU_ENGINE, [None]) as cluster:
        cluster.procs[0].kill()
        config = ClusterConfig(homogeneous(1, "vllm"), SLO(5.0, 1.0), router="round-robin")
        cluster.replay(Workload("w", specs()), config)


def test_replay_command_with_replicas_on_cpu_engines(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    common = ["replay", "--model", "tiny", "--device", "cpu", "--num-blocks", "200", "--max-context", "1024"]
    res = CliRunner().invoke(app, [*common, "--replicas", "2", "--router", "nope", "-n", "6"])
    assert isinstance(res.exception, ConfigError) and "unknown router 'nope'" in str(res.exception)  # main(): exit 2
    args = [
        *common,
        "--replicas",
        "2",
        "--router",
        "least-outstanding",
        "-n",
        "6",
        "--qps",
        "50",
        "--out",
        str(tmp_path),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == 6


def test_replay_command_with_replicas_and_prefix_caching(tmp_path):
    """A Mooncake-format trace whose prompts share their first 512-token block: with --prefix-caching on two
    replicas behind prefix-affinity, every later prompt goes where that block is cached and finds it there."""
    from test_gpu_backend import shared_prefix_hit_bounds, shared_prefix_trace
    from typer.testing import CliRunner

    from fairbatching.cli import app

    trace = shared_prefix_trace(tmp_path / "t.jsonl")
    args = ["replay", "--model", "tiny", "--device", "cpu", "--num-blocks", "400", "--max-context", "1024"]
    args += ["--replicas", "2", "--router", "prefix-affinity", "--trace", trace, "--prefix-caching"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["requests"] == summary["finished"] == 6
    least, most = shared_prefix_hit_bounds(tmp_path / "out" / "requests.csv")
    assert most == pytest.approx(5 * 512 / sum(560 + 8 * i for i in range(6)))
    assert least - 1e-9 <= summary["prefix_hit_rate"] <= most + 1e-9
