"""Ray Serve integration: the PAB request router, simulated replicas in real time, the OpenAI endpoint and the
trace-replay client. The pure parts run without Ray; the rest share one local Ray instance (start-up is the
slow part) and replay a bursty trace through HTTP with `fairbatching bench`."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fairbatching.cluster.routers import ReportAging
from fairbatching.core.request import SLO
from fairbatching.integrations.ray_serve.node_server import NodeOptions, NodeServer
from fairbatching.integrations.ray_serve.protocol import BadRequest, ByteTokenizer, parse_completion
from fairbatching.integrations.ray_serve.routing import PABRanking, RoutingRefused

SLO_ = SLO(1.0, 0.05)


def parse(body):
    return parse_completion(body, SLO_, "m", 4096, ByteTokenizer())


def test_completion_bodies_are_checked_field_by_field():
    r = parse({"prompt": "héllo", "max_tokens": 3, "stream": True, "vllm_xargs": {"ttft_slo": 0.5}})
    assert (r.prompt_tokens, r.max_tokens, r.stream, r.slo) == (6, 3, True, SLO(0.5, 0.05))
    assert parse({"prompt": [[5, 6, 7]], "model": "m"}).prompt_tokens == 3
    bad = {
        "a list": ([1], "JSON object"),
        "no prompt": ({"max_tokens": 3}, "'prompt' is required"),
        "empty prompt": ({"prompt": ""}, "empty"),
        "prompt of floats": ({"prompt": [1.5]}, "'prompt' must be"),
        "several prompts": ({"prompt": ["a", "b"]}, "one prompt per request"),
        "negative token": ({"prompt": [-1]}, "non-negative"),
        "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be >= 1"),
        "max_tokens text": ({"prompt": "x", "max_tokens": "3"}, "'max_tokens' must be an integer"),
        "too long": ({"prompt": [1] * 4000, "max_tokens": 100}, "exceeds the maximum context 4096"),
        "other model": ({"prompt": "x", "model": "gpt"}, "not served here"),
        "bad slo": ({"prompt": "x", "vllm_xargs": {"tpot_slo": -1}}, "'tpot_slo' must be >= 0"),
        "zero slo": ({"prompt": "x", "vllm_xargs": {"ttft_slo": 0}}, "must be positive"),
        "stream text": ({"prompt": "x", "stream": "yes"}, "'stream' must be true or false"),
        "n=2": ({"prompt": "x", "n": 2}, "'n' must be 1"),
    }
    for body, message in bad.values():
        with pytest.raises(BadRequest, match=message):
            parse(body)


def stats(t: float, tokens: int, outstanding: int = 0) -> dict:
    budget = {"seconds": 1.0, "tokens": tokens, "decode_share": 0.0, "queued_seconds": 0.0}
    return {
        "time": t,
        "outstanding": outstanding,
        "queued_tokens": 0,
        "kv_used_tokens": 0,
        "budget": {**budget, "free_slots": 8, "horizon": 1.0},
    }


def test_pab_ranking_uses_the_cluster_core_decay_silence_and_sent_counts():
    ranking = PABRanking(ReportAging(1.0, 0.0), "reject")
    reports = {"a": stats(0.0, 1000), "b": stats(0.0, 600), "c": {}}  # c has not reported yet
    assert ranking.decide(100, 10.0, reports, 0.5).order == ["a", "b"]
    ranking.note_sent("a", 500)  # counted against a's report until a newer one arrives
    assert ranking.decide(100, 10.0, reports, 0.5).order == ["b", "a"]
    # A report one interval late has its budget halved (2 s staleness limit), like the simulator's.
    assert [v.budget.tokens for v in ranking.views(reports, 1.5)] == [500, 300]
    refused = ranking.decide(400, 10.0, reports, 1.5)
    assert refused.order == [] and "no replica's prefill budget fits 400 tokens" in refused.refusal
    silent = ranking.decide(10, 2.0, reports, 2.5)  # past the staleness limit and the request's TTFT
    assert "none has reported within the staleness limit" in silent.refusal
    assert ranking.decide(10, 9.0, reports, 2.5) == type(silent)([])  # still time: wait for a report
    assert sum(ranking.refusals.values()) == 2
    fresh = {"a": stats(3.0, 1000), "b": stats(3.0, 600)}
    assert ranking.decide(100, 10.0, fresh, 3.1).order == ["a", "b"]  # a new report starts the count afresh


def test_pab_ranking_defer_holds_until_the_ttft_is_lost():
    ranking = PABRanking(ReportAging(0.5, 0.0), "defer")
    reports = {"a": stats(0.0, 100)}
    assert ranking.decide(1000, 2.0, reports, 0.1).refusal is None  # held: fresh reports may fit it
    refused = ranking.decide(1000, 0.5, reports, 0.1)
    assert "deferred until it could no longer make its TTFT" in refused.refusal
    assert PABRanking(ReportAging(0.5), "none").decide(1000, 0.5, reports, 0.1).order == ["a"]
    err = RoutingRefused("why", 0.2)
    assert err.retry_after_header == "1" and str(err) == "why"


def test_node_server_streams_every_token_and_reports_its_budget():
    async def run():
        server = NodeServer(NodeOptions(slo=SLO(1.0, 0.05), time_scale=0.2))
        assert server.report()["budget"]["tokens"] > 0

        async def one(i):
            events = [e async for e in server.generate(f"r{i}", time.time(), 200 + 300 * i, 6, None)]
            return sum(e.count for e in events), events[-1]

        results = await asyncio.gather(*(one(i) for i in range(12)))
        busy = server.report()
        return results, busy

    results, report = asyncio.run(run())
    assert all(n == 6 and end.finished and end.status == "finished" for n, end in results)
    assert report["outstanding"] == 0 and report["kv_used_tokens"] == 0


# --- on a local Ray instance -----------------------------------------------------------------------------

TIME_SCALE = 4.0
TRACE_SLO = SLO(2.0, 0.2)  # wall seconds: the profile's 0.5 s / 50 ms at TIME_SCALE 4


def bursty_trace(
    path: Path, n: int = 240, bursts: int = 6, gap: float = 0.6, seed: int = 7, outputs: tuple[int, int] = (4, 16)
) -> Path:
    """Bursts of requests, 20% of them long prompts (4k-12k tokens), outputs of ``outputs`` tokens; ``gap``
    seconds of the profile between bursts (stretched by ``TIME_SCALE``, as the replicas are)."""
    rng = random.Random(seed)
    rows = []
    for b in range(bursts):
        for _ in range(n // bursts):
            prompt = rng.randint(4000, 12000) if rng.random() < 0.2 else rng.randint(100, 800)
            rows.append(((b * gap + rng.random() * 0.25) * TIME_SCALE, prompt, rng.randint(*outputs)))
    rows.sort()
    lines = [json.dumps({"timestamp": t * 1000, "input_length": p, "output_length": o}) for t, p, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url():
    pytest.importorskip("aiohttp", reason="needs the [serve] extra (aiohttp)")
    ray = pytest.importorskip("ray", reason="needs the [serve] extra (ray[serve])")
    serve = pytest.importorskip("ray.serve", reason="needs the [serve] extra (ray[serve])")

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(url: str, router: str, admission: str = "reject", replicas: int = 4) -> None:
    """(Re)deploy the app and wait until it serves (for PAB: until every replica has reported)."""
    import urllib.request

    from ray import serve

    from fairbatching.integrations.ray_serve.app import ServeConfig, build_app

    node = NodeOptions(slo=TRACE_SLO, time_scale=TIME_SCALE)
    config = ServeConfig(replicas, node, router, admission if router == "pab" else "none", 0.2, 0.1)
    serve.run(build_app(config), name="fairbatching", route_prefix="/")
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1, "vllm_xargs": {"ttft_slo": 30}}).encode()
    for _ in range(replicas * 2):  # reach every replica once, so none starts the trace cold
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200


def server_counts(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/fairbatching/stats", timeout=30) as resp:
        return json.loads(resp.read())


def bench(url: str, trace: Path, out: Path, on_start=None) -> dict:
    """Replay ``trace`` with the `bench` client; ``on_start`` is called as it starts sending (after its
    start-up, which on a loaded machine takes seconds), so timed events line up with the trace."""
    args = [sys.executable, "-m", "fairbatching", "bench", "--url", url, "--trace", str(trace)]
    args += ["--ttft-slo", str(TRACE_SLO.ttft), "--tpot-slo", str(TRACE_SLO.tpot), "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:
        err.append(line)
        if line.startswith("replaying"):
            break
    if on_start is not None:
        on_start()
    _stdout, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(err) + rest
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "requests.csv").read_text().splitlines()[1:]
    summary["ids"] = [row.split(",")[0] for row in rows]
    return summary


def diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def test_bad_request_bodies_get_400_with_a_message(serve_url):
    import urllib.error
    import urllib.request

    deploy(serve_url, "pab")
    for body, message in ((b"{not json", "not valid JSON"), (b'{"prompt": 5}', "'prompt' must be")):
        req = urllib.request.Request(f"{serve_url}/v1/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400 and message in json.loads(err.value.read())["error"]["message"]


def test_bursty_trace_every_request_accounted_and_pab_meets_at_least_the_default_routers_slos(serve_url, tmp_path):
    trace = bursty_trace(tmp_path / "bursty.jsonl")
    results = {}
    for router in ("pab", "default"):
        deploy(serve_url, router)
        before = server_counts(serve_url)
        results[router] = s = bench(serve_url, trace, tmp_path / router)
        server = diff(server_counts(serve_url), before)
        # Every request accounted for once, on both sides, with a reason for every refusal.
        assert sorted(s["ids"]) == sorted(f"bursty-{i}" for i in range(240))
        assert s["requests"] == 240 == sum(s["outcomes"].values())
        assert s["outcomes"].get("finished", 0) == s["finished"] == server.get("finished", 0)
        refused = {k: v for k, v in s["outcomes"].items() if k.startswith("rejected")}
        assert all("admission control" in k for k in refused)
        assert sum(refused.values()) == sum(v for k, v in server.items() if k.startswith("refused"))
        assert not [k for k in s["outcomes"] if k.startswith("failed")]
    pab, default = results["pab"], results["default"]
    met = {k: round(v["slo_attainment"] * v["requests"]) for k, v in results.items()}
    print(f"SLOs met: PAB {met['pab']}/240 ({pab['rejected']} refused), default {met['default']}/240")
    assert default["rejected"] == 0 and met["pab"] >= met["default"]


def test_replica_killed_mid_run_reroutes_unstarted_requests_and_fails_begun_streams_clearly(serve_url, tmp_path):
    import ray

    deploy(serve_url, "pab", admission="none", replicas=3)
    # Outputs long enough that the first burst is still streaming when the second arrives and the replica dies.
    trace = bursty_trace(tmp_path / "bursty.jsonl", n=240, bursts=4, gap=1.5, outputs=(40, 80))
    before = server_counts(serve_url)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#NodeReplica#" in a["name"]]
    assert len(victims) == 3

    def kill() -> None:
        time.sleep(1.72 * TIME_SCALE)  # late in the second burst: the replica has streams running and requests queued
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)

    killer = threading.Thread(target=kill)
    s = bench(serve_url, trace, tmp_path / "kill", on_start=killer.start)
    killer.join()
    server = diff(server_counts(serve_url), before)
    assert sorted(s["ids"]) == sorted(f"bursty-{i}" for i in range(240)) and s["requests"] == 240
    failed = {k: v for k, v in s["outcomes"].items() if k != "finished"}
    # Streams that had begun end with a clear error; nothing else fails and nothing is silently dropped.
    assert failed and all(k.startswith("failed: request") and "its replica died after" in k for k in failed)
    assert sum(failed.values()) == server["failed: replica died mid-stream"]
    assert s["finished"] == server["finished"] == 240 - sum(failed.values())
    rerouted = server.get("rerouted: replica died before the first token", 0)
    print(f"replica killed: {sum(failed.values())} begun streams failed, {rerouted} unstarted requests re-routed")
    assert rerouted >= 1  # requests queued on the dead replica were sent again, and finished
