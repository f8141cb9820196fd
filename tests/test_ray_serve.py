"""Ray Serve integration: the PAB request router, simulated replicas in real time, the OpenAI endpoint and the
trace-replay client. The pure parts run without Ray; `fairbatching serve` runs as a process where its own
start and stop are tested (bad port, SIGTERM); the rest share one local Ray instance (start-up is the slow
part) and replay a bursty trace through HTTP with `fairbatching bench`.

The whole module runs beside a process that keeps an idle core busy (``cpu_burner``), so a test that leans on
timing fails here first rather than on a loaded CI machine: tests wait on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fairbatching.core.kv import token_block_hashes
from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.ray_serve.node_server import NodeOptions, NodeServer
from fairbatching.integrations.ray_serve.protocol import (
    BadRequest,
    ByteTokenizer,
    Limits,
    RequestChecker,
    parse_completion,
)
from fairbatching.integrations.ray_serve.routing import Decision, PABRanking, RoutingRefused

SLO_ = SLO(1.0, 0.05)


@pytest.fixture(scope="module", autouse=True)
def cpu_burner():
    """A busy loop for the module's duration: the Ray Serve tests must hold on a loaded machine. At nice 10 it takes
    a whole idle core (so a test that leans on timing fails here first) but mostly yields where the machine is
    already loaded: with another process on one core of two, a second full-priority burner starved Ray's own
    actor start-up (its proxy killed before it ran), which no test can wait out."""
    proc = subprocess.Popen([sys.executable, "-c", "import os\nos.nice(10)\nwhile True: pass"])
    yield proc
    proc.kill()
    proc.wait()


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
        "max_tokens null": ({"prompt": [1, 2, 3], "max_tokens": None}, "'max_tokens' must be an integer, got None"),
        "ttft_slo null": ({"prompt": "x", "vllm_xargs": {"ttft_slo": None}}, "'ttft_slo' must be a number"),
        "tpot_slo null": ({"prompt": "x", "vllm_xargs": {"tpot_slo": None}}, "'tpot_slo' must be a number"),
        "lone surrogate": ({"prompt": "\ud800", "max_tokens": 2}, "'prompt' is not valid Unicode"),
        "nested four deep": ({"prompt": [[[[1]]]]}, "'prompt' must be"),
        "nested list of lists": ({"prompt": [[[1, 2]]]}, "'prompt' must be"),
        "include_usage text": ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "'stream_options.incl"),
        "nan slo": ({"prompt": "x", "vllm_xargs": {"ttft_slo": float("nan")}}, "'ttft_slo' must be >= 0"),
        "bool max_tokens": ({"prompt": "x", "max_tokens": True}, "'max_tokens' must be an integer"),
        "huge max_tokens": ({"prompt": "x", "max_tokens": 10**400}, "'max_tokens' is too large"),
        "huge slo": ({"prompt": "x", "vllm_xargs": {"ttft_slo": 10**400}}, "'ttft_slo' is too large"),
        "temperature text": ({"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
        "top_p above 1": ({"prompt": "x", "top_p": 1.5}, "'top_p' must be <= 1"),
        "negative temperature": ({"prompt": "x", "temperature": -1}, "'temperature' must be >= 0"),
        "seed float": ({"prompt": "x", "seed": 1.5}, "'seed' must be an integer"),
        "stop number": ({"prompt": "x", "stop": 3}, "'stop' must be a string or a list of strings"),
        "echo text": ({"prompt": "x", "echo": "yes"}, "'echo' must be true or false"),
    }
    for body, message in bad.values():
        with pytest.raises(BadRequest, match=re.escape(message)):
            parse(body)
    sampled = {"temperature": 0, "top_p": 0.9, "seed": 7, "stop": ["\n"], "echo": False, "logprobs": None}
    assert parse({"prompt": "x", **sampled}).max_tokens == 16  # well-typed sampling fields pass


def test_request_checker_refuses_slos_below_the_profile_floor_or_above_the_ceiling_and_bad_json():
    cost = load_profile(None).cost_model()
    checker = RequestChecker("m", 131072, SLO_, cost, Limits(max_slo_s=60.0))
    step = cost.predict(1, 1, 1, 1.0)
    assert checker.parse_bytes(b'{"prompt": [1, 2, 3], "max_tokens": 2}').slo == SLO_
    bad = {
        b'{"prompt": "x", "vllm_xargs": {"tpot_slo": 1e-9}}': "'tpot_slo' 1e-09 s is below one decode step",
        f'{{"prompt": "x", "vllm_xargs": {{"tpot_slo": {step * 0.9}}}}}'.encode(): "below one decode step",
        b'{"prompt": [1], "vllm_xargs": {"ttft_slo": 1e-9}}': "'ttft_slo' 1e-09 s is below one prefill of its 1",
        b'{"prompt": "x", "vllm_xargs": {"ttft_slo": 61}}': "'ttft_slo' 61 s is above this server's ceiling",
        b'{"prompt": "x", "vllm_xargs": {"tpot_slo": 1e400}}': "'tpot_slo' must be >= 0",
        b"[" * 100_000: "nests too deeply",
        b"\xff\xfe{}": "not valid JSON",
        b"{not json": "not valid JSON",
    }
    for raw, message in bad.items():
        with pytest.raises(BadRequest, match=message):
            checker.parse_bytes(raw)
    # A long prompt's TTFT floor is its prefill: what one short prompt may ask, 20k tokens may not.
    long = json.dumps({"prompt": [1] * 20000, "vllm_xargs": {"ttft_slo": 0.01}}).encode()
    with pytest.raises(BadRequest, match="below one prefill of its 20000 tokens"):
        checker.parse_bytes(long)
    assert checker.parse_bytes(b'{"prompt": [1], "vllm_xargs": {"ttft_slo": 0.01}}').slo.ttft == 0.01
    for limits in ({"max_body_bytes": 10}, {"body_timeout_s": float("nan")}, {"max_slo_s": 0}):
        with pytest.raises(ConfigError):
            Limits(**limits)


def test_serve_option_defaults_mirror_the_limits():
    """`serve`'s options repeat Limits' defaults (the CLI does not import it, so --help stays light)."""
    import inspect

    from fairbatching.integrations.ray_serve import commands

    options = inspect.signature(commands.serve).parameters
    defaults = tuple(options[k].default for k in ("max_body_bytes", "body_timeout", "max_slo"))
    assert defaults == (Limits().max_body_bytes, Limits().body_timeout_s, Limits().max_slo_s)


def test_default_router_works_with_its_own_default_admission():
    pytest.importorskip("ray.serve", reason="needs the [serve] extra (ray[serve])")
    from fairbatching.integrations.ray_serve.app import ServeConfig

    assert ServeConfig(router="default").admission == "none"
    assert ServeConfig(router="pab").admission == "reject"
    with pytest.raises(ConfigError, match="needs --router pab"):
        ServeConfig(router="default", admission="reject")
    with pytest.raises(ConfigError, match="above --max-slo"):
        ServeConfig(node=NodeOptions(slo=SLO(100.0, 0.1)), limits=Limits(max_slo_s=50.0))


def stats(t: float, tokens: int, outstanding: int = 0) -> dict:
    budget = {"seconds": 1.0, "tokens": tokens, "decode_share": 0.0, "queued_seconds": 0.0}
    return {
        "time": t,
        "outstanding": outstanding,
        "queued_tokens": 0,
        "kv_used_tokens": 0,
        "budget": {**budget, "free_slots": 8, "horizon": 1.0},
    }


def test_pab_ranking_reads_each_last_report_however_old_less_what_was_sent_since():
    ranking = PABRanking("reject", interval=1.0)
    reports = {"a": stats(0.0, 1000), "b": stats(0.0, 600), "c": {}}  # c has not reported yet: not ranked
    assert ranking.decide(100, 10.0, reports, 0.5).order == ["a", "b"]
    ranking.note_sent("a", 500)  # counted against a's report until a newer one arrives
    assert ranking.decide(100, 10.0, reports, 0.5).order == ["b", "a"]
    # 100 s later with no newer report (a loaded machine's controller delivers late): still ranked, on the
    # whole reported budget less what was sent since, and never refused for the reports' age.
    assert [v.budget.tokens for v in ranking.views(reports)] == [1000, 600]
    assert ranking.decide(550, 200.0, reports, 100.0).order == ["b", "a"]
    ranking.note_sent("b", 550)  # left: a 500, b 50
    refused = ranking.decide(501, 200.0, reports, 100.0)
    assert refused == Decision([], "admission control: no replica's prefill budget fits 501 tokens")
    assert ranking.decide(500, 200.0, reports, 100.0).order == ["a", "b"]
    assert ranking.refusals == {refused.refusal: 1}
    fresh = {"a": stats(103.0, 1000), "b": stats(103.0, 600)}
    assert ranking.decide(100, 200.0, fresh, 103.1).order == ["a", "b"]  # a new report starts the count afresh


def test_pab_ranking_before_any_report_routes_unranked_the_least_sent_first():
    ranking = PABRanking("reject", interval=0.5)
    none_yet = {"a": {}, "b": {}, "c": {}}
    # Nothing to judge by: never refused or held, however large the prompt or late the request.
    assert ranking.decide(10**9, 0.1, none_yet, 9.0) == Decision(["a", "b", "c"])
    ranking.note_sent("a", 10)
    ranking.note_sent("b", 10)
    assert ranking.decide(10, 0.1, none_yet, 9.0).order == ["c", "a", "b"]
    ranking.forget("a")  # a left (and came back): its count starts afresh
    assert ranking.decide(10, 0.1, none_yet, 9.0).order == ["a", "c", "b"]
    assert not ranking.refusals


def test_pab_ranking_defer_holds_until_the_ttft_is_lost():
    ranking = PABRanking("defer", interval=0.5)
    reports = {"a": stats(0.0, 100)}
    assert ranking.decide(1000, 2.0, reports, 0.1) == Decision([])  # held: fresh reports may fit it
    refused = ranking.decide(1000, 0.5, reports, 0.1)
    assert "deferred until it could no longer make its TTFT" in refused.refusal
    # Held only while a fresh report (one period plus the delivery delay away) can come before the deadline.
    assert PABRanking("defer", 0.5, 0.0).decide(1000, 1.0, reports, 0.1) == Decision([])
    assert PABRanking("defer", 0.5, 0.5).decide(1000, 1.0, reports, 0.1).refusal is not None
    assert PABRanking("none", 0.5).decide(1000, 0.5, reports, 0.1).order == ["a"]
    assert PABRanking("none", 0.5).decide(10, 0.5, {"a": {}, "b": {}}, 9.0) == Decision(["a", "b"])
    err = RoutingRefused("why", 0.2)
    assert err.retry_after_header == "1" and str(err) == "why"


def test_pab_affinity_ranks_a_replica_by_its_budget_after_the_prompt_it_has_not_been_sent():
    blocks = token_block_hashes(list(range(1600)), 16)  # a 1600-token history: 100 blocks
    turn = (*blocks, *token_block_hashes(list(range(1600, 1700)), 16))  # the next turn: history + 100 tokens
    reports = {"a": stats(0.0, 3000), "b": stats(0.0, 2000)}
    pab, affinity = PABRanking("reject", 1.0), PABRanking("reject", 1.0, router="pab-affinity", kv_blocks=1000)
    for ranking in (pab, affinity):
        assert ranking.decide(1600, 10.0, reports, 0.5, blocks=blocks).order == ["a", "b"]
        ranking.note_sent("a", 1600, blocks)  # left: a 1400, b 2000
    # The next turn: PAB sees b's larger budget; pab-affinity sees that a prefills only its 100 new tokens.
    assert pab.decide(1700, 10.0, reports, 0.5, blocks=turn).order == ["b", "a"]
    assert affinity.decide(1700, 10.0, reports, 0.5, blocks=turn).order == ["a", "b"]
    # Admission prices the uncached part too: 2500 tokens fit no budget whole, but a holds 1600 of them.
    assert pab.decide(2500, 10.0, reports, 0.5, blocks=turn).refusal is not None
    assert affinity.decide(2500, 10.0, reports, 0.5, blocks=turn).order == ["a", "b"]


def test_prefix_affinity_follows_the_blocks_it_sent_while_loads_stay_within_bounds():
    blocks = token_block_hashes(list(range(320)), 16)
    ranking = PABRanking("none", 1.0, router="prefix-affinity", kv_blocks=1000)
    reports = {"a": stats(0.0, 0, outstanding=3), "b": stats(0.0, 0, outstanding=0)}
    assert ranking.decide(320, 10.0, reports, 0.5, blocks=blocks).order == ["b", "a"]  # no match: least loaded
    ranking.note_sent("b", 320, blocks)
    busier = {"a": stats(1.0, 0, outstanding=0), "b": stats(1.0, 0, outstanding=5)}
    assert ranking.decide(320, 10.0, busier, 1.5, blocks=blocks).order == ["b", "a"]  # where its prefix is
    assert ranking.decide(320, 10.0, busier, 1.5).order == ["a", "b"]  # no blocks: least loaded
    swamped = {"a": stats(2.0, 0, outstanding=0), "b": stats(2.0, 0, outstanding=20)}
    assert ranking.decide(320, 10.0, swamped, 2.5, blocks=blocks).order == ["a", "b"]  # past the imbalance bound
    with pytest.raises(ConfigError, match="admission control needs the pab router"):
        PABRanking("reject", 1.0, router="prefix-affinity")


def test_with_prefix_caching_the_checker_hashes_each_prompt_as_the_nodes_cache_does():
    pytest.importorskip("ray.serve", reason="needs the [serve] extra (ray[serve])")
    from fairbatching.integrations.ray_serve.app import ServeConfig

    text = "the same system prompt, then a question" * 3
    plain = ServeConfig().checker().parse({"prompt": text})
    cached = ServeConfig(node=NodeOptions(prefix_caching=True)).checker()
    assert plain.block_hashes == () and cached.parse({"prompt": text}).block_hashes == token_block_hashes(
        list(text.encode()), load_profile(None).kv.block_size
    )
    ids = list(text.encode())
    assert cached.parse({"prompt": [ids]}).block_hashes == cached.parse({"prompt": text}).block_hashes
    assert ServeConfig(router="pab-affinity").admission == "reject"
    assert ServeConfig(router="prefix-affinity").admission == "none"
    with pytest.raises(ConfigError, match="needs --router pab or pab-affinity"):
        ServeConfig(router="prefix-affinity", admission="reject")


def test_a_node_with_prefix_caching_serves_a_repeated_prefix_from_its_cache():
    blocks = token_block_hashes(list(range(4096)), 16)

    async def run():
        server = NodeServer(NodeOptions(slo=SLO(5.0, 0.05), time_scale=0.2, prefix_caching=True))
        hits: dict[str, int] = {}
        server.node.on_finish = lambda r: hits.setdefault(r.request_id, r.prefix_hit)
        first = [e async for e in server.generate("r0", time.time(), 4096, 2, None, blocks)]
        again = [e async for e in server.generate("r1", time.time(), 4096 + 16, 2, None, blocks)]
        return first[-1], again[-1], hits, len(server.node.kv.cached)

    first, again, hits, cached = asyncio.run(run())
    assert first.status == again.status == "finished"
    assert hits == {"r0": 0, "r1": 4096} and cached == 256  # r1 prefilled only the 16 tokens r0 had not


def test_node_server_streams_every_token_and_reports_its_budget():
    async def run():
        server = NodeServer(NodeOptions(slo=SLO(1.0, 0.05), time_scale=0.2))
        assert server.report()["budget"]["tokens"] > 0

        async def one(i):
            events = [e async for e in server.generate(f"r{i}", time.time(), 200 + 300 * i, 6, None)]
            return sum(e.count for e in events), events[-1]

        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        seen = set()
        while not all(t.done() for t in tasks):  # the report tells unstarted requests from streaming ones
            r = server.report()
            seen.add((r["unstarted"] > 0, r["streaming"] > 0))
            await asyncio.sleep(0)
        results = [t.result() for t in tasks]
        busy = server.report()
        return results, busy, seen

    results, report, seen = asyncio.run(run())
    assert all(n == 6 and end.finished and end.status == "finished" for n, end in results)
    assert report["outstanding"] == 0 and report["kv_used_tokens"] == 0
    assert report["unstarted"] == report["streaming"] == 0 and (True, True) in seen


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


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairbatching", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_serve_refuses_a_taken_port_a_bad_port_or_host_with_one_line_before_ray_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "already in use" in one_error_line(cli("serve", "--port", str(port)))
    assert "--port" in one_error_line(cli("serve", "--port", "99999"))
    assert "--host 999.1.1.1" in one_error_line(cli("serve", "--host", "999.1.1.1"))
    assert "--max-slo" in one_error_line(cli("serve", "--max-slo", "nan"))


def test_bench_checks_its_out_folder_and_timeout_before_sending(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a check made after sending would say so instead
    trace = bursty_trace(tmp_path / "t.jsonl", n=6, bursts=1)
    base = ["bench", "--url", url, "--trace", str(trace)]
    assert "--timeout" in one_error_line(cli(*base, "--timeout", "nan"))
    (tmp_path / "file").write_text("mine")
    assert "--out" in one_error_line(cli(*base, "--out", str(tmp_path / "file")))
    folder = tmp_path / "folder"
    (folder / "requests.csv").mkdir(parents=True)
    assert "requests.csv exists and is not a file" in one_error_line(cli(*base, "--out", str(folder)))
    assert [p.name for p in folder.iterdir()] == ["requests.csv"]  # nothing written


def proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (None when gone): a PID reused by another process does not count."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process under ``pid``, with its start time (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if (start := proc_start(p)) is not None:
            out[p] = start
        todo += children.get(p, [])
    return out


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def post(url: str, body: bytes | dict, timeout: float = 60, method: str = "POST") -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"{url}/v1/completions", data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, {"raw": text.decode(errors="replace")}


def stream(url: str, body: dict, begun: threading.Event | None = None) -> str:
    """A streaming completion read to its end: ``finished``, ``error: message``, ``HTTP code`` or what broke."""
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return "error: " + chunk["error"]["message"]
                if begun is not None:
                    begun.set()
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    return "finished"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except OSError as exc:
        return f"broken: {exc}"
    return "ended without a finish"


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_sigterm_under_load_drains_in_flight_requests_exits_0_and_leaves_no_process(tmp_path):
    pytest.importorskip("ray.serve", reason="needs the [serve] extra (ray[serve])")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    args = ["serve", "--replicas", "2", "--port", str(port), "--time-scale", "2", "--drain-timeout", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "fairbatching", *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: up(url) or proc.poll() is not None, 300, "the server to answer")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert post(url, {"prompt": [1, 2], "max_tokens": 2})[0] == 200  # every replica started
        ray_processes = descendants(proc.pid)
        # Short streams (300 tokens, ~2 s of steps) finish inside the drain window; long ones (~3 min) cannot.
        jobs = [(300, threading.Event()) for _ in range(6)] + [(30000, threading.Event()) for _ in range(2)]
        results: dict[int, str] = {}

        def client(i: int, n: int, begun: threading.Event) -> None:
            results[i] = stream(url, {"prompt": [1] * 50, "max_tokens": n}, begun)

        threads = [threading.Thread(target=client, args=(i, n, b)) for i, (n, b) in enumerate(jobs)]
        for t in threads:
            t.start()
        wait_for(lambda: all(b.is_set() for _, b in jobs), 120, "every stream to begin")
        proc.terminate()  # SIGTERM
        # While it drains, a new request is refused with 503 (or, once the proxy is gone, not answered).
        refused = wait_for(lambda: post(url, {"prompt": [1], "max_tokens": 1}, timeout=30)[0] == 503, 60, "a 503")
        for t in threads:
            t.join(timeout=120)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert refused
    assert [results[i] for i in range(6)] == ["finished"] * 6, str(results)
    assert all("the server shut down after" in results[i] for i in (6, 7)), str(results)
    drained = re.search(r"drained: (\d+) of (\d+) requests in flight finished, (\d+) ended with", output)
    assert drained and int(drained[3]) == 2, output[-3000:]  # the probes for a 503 may add finished ones
    assert len(ray_processes) >= 5  # gcs, raylet, agents, proxy, controller, replicas: the check sees them
    wait_for(lambda: not [p for p, t in ray_processes.items() if proc_start(p) == t], 60, "Ray's processes to exit")


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


def deploy(
    url: str, router: str, admission: str | None = None, replicas: int = 4, limits: Limits | None = None
) -> None:
    """(Re)deploy the app and wait until it serves (for PAB: until every replica has reported)."""
    from ray import serve

    from fairbatching.integrations.ray_serve.app import ServeConfig, build_app

    node = NodeOptions(slo=TRACE_SLO, time_scale=TIME_SCALE)
    config = ServeConfig(replicas, node, router, admission, 0.2, 0.1, limits=limits or Limits())
    serve.run(build_app(config), name="fairbatching", route_prefix="/")
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1, "vllm_xargs": {"ttft_slo": 30}}).encode()
    for _ in range(replicas * 2):  # reach every replica once, so none starts the trace cold
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200


def server_counts(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/fairbatching/stats", timeout=30) as resp:
        return json.loads(resp.read())


def server_inflight(url: str) -> int:
    with urllib.request.urlopen(f"{url}/v1/fairbatching/inflight", timeout=30) as resp:
        return json.loads(resp.read())["in_flight"]


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


BAD_BODIES = [  # (body, status, what the message says)
    (b"{not json", 400, "not valid JSON"),
    (b'{"prompt": 5}', 400, "'prompt' must be"),
    (b'{"prompt":[1,2,3],"max_tokens":null}', 400, "'max_tokens'"),
    (b'{"prompt":[1,2,3],"vllm_xargs":{"ttft_slo":null}}', 400, "'ttft_slo'"),
    (b'{"prompt":[1,2,3],"vllm_xargs":{"tpot_slo":null}}', 400, "'tpot_slo'"),
    (b'{"prompt":"\\ud800","max_tokens":2}', 400, "'prompt' is not valid Unicode"),
    (b"[" * 60_000, 400, "nests too deeply"),
    (b'{"prompt":[[[[1]]]]}', 400, "'prompt' must be"),
    (b'{"prompt":[1],"vllm_xargs":{"tpot_slo":1e-9}}', 400, "'tpot_slo' 1e-09 s is below one decode step"),
    (b'{"prompt":[1],"vllm_xargs":{"ttft_slo":1e-9}}', 400, "'ttft_slo' 1e-09 s is below one prefill"),
    (b'{"prompt":[1],"vllm_xargs":{"ttft_slo":1e9}}', 400, "'ttft_slo' 1e+09 s is above this server's ceiling"),
    (b'{"prompt":[1],"vllm_xargs":{"ttft_slo":NaN}}', 400, "'ttft_slo'"),
    (b'{"prompt":[1],"max_tokens":1e400}', 400, "'max_tokens'"),
    (b'{"prompt":[1],"vllm_xargs":[1]}', 400, "'vllm_xargs'"),
    (b'{"prompt":[1],"stream_options":{"include_usage":1}}', 400, "'stream_options.include_usage'"),
    (b'{"prompt":[true]}', 400, "'prompt'"),
    (b'{"prompt":[4294967296]}', 400, "'prompt' token ids"),
    (b'{"prompt":[1],"model":{"a":1}}', 400, "'model'"),
    (b'"a string"', 400, "JSON object"),
    (b"\xff\xfe\x00", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b'{"prompt":[1],"max_tokens":1' + b"0" * 400 + b"}", 400, "'max_tokens' is too large (401 digits)"),
    (b'{"prompt":[1],"max_tokens":' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b'{"prompt":[1],"temperature":"hot"}', 400, "'temperature' must be a number"),
    (b'{"prompt":"' + b"a" * 70_000 + b'"}', 413, "over the limit of 65536 bytes"),
]


def test_bad_request_bodies_get_a_4xx_naming_the_field_and_the_server_keeps_answering(serve_url):
    """The issue's corpus and more: never a 500, and nothing reaches a replica."""
    import http.client

    deploy(serve_url, "pab", limits=Limits(max_body_bytes=64 << 10, body_timeout_s=2.0))
    before = server_counts(serve_url)
    for body, code, message in BAD_BODIES:
        status, reply = post(serve_url, body)
        assert (status, message in reply["error"]["message"]) == (code, True), (body[:60], reply)
    # Chunked, so no Content-Length to refuse it by: cut off as it passes the limit.
    host, port = serve_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", (b"[" + b"1," * 8000 for _ in range(10)), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "over the limit" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert post(serve_url, b"", method="GET")[0] == 405
    status, reply = post(serve_url, {"prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200 and reply["choices"][0]["text"] == "ab"
    counts = diff(server_counts(serve_url), before)
    assert counts == {"bad request": len(BAD_BODIES) - 1, "bad request: body too large": 2, "finished": 1}


@contextlib.contextmanager
def a_body_begun(url: str):
    """A raw connection whose request declares a 100-byte body and sends its first bytes only."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ')
        yield sock


def test_a_slow_client_is_cut_off_by_the_body_read_timeout(serve_url):
    deploy(serve_url, "pab", limits=Limits(body_timeout_s=1.0))
    before = server_counts(serve_url)
    with a_body_begun(serve_url) as sock:  # and then nothing
        reply = b""
        while chunk := sock.recv(65536):  # until the server answers and closes (60 s is only a deadline)
            reply += chunk
            if b"did not arrive" in reply:
                break
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
    assert diff(server_counts(serve_url), before) == {"bad request: body read timed out": 1}


def test_a_client_that_goes_away_mid_stream_is_counted_as_cancelled(serve_url):
    import http.client

    deploy(serve_url, "pab", replicas=1)
    before = server_counts(serve_url)
    host, port = serve_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": [1] * 10, "max_tokens": 5000, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data:")  # its stream has begun
    conn.close()
    counts = wait_for(lambda: diff(server_counts(serve_url), before) or None, 60, "the disconnect to be counted")
    assert counts == {"cancelled: client disconnected": 1}


def test_a_client_that_goes_away_while_its_body_is_read_is_counted_as_cancelled(serve_url):
    deploy(serve_url, "pab", limits=Limits(body_timeout_s=30.0))
    before = server_counts(serve_url)
    with a_body_begun(serve_url):
        wait_for(lambda: server_inflight(serve_url) or None, 60, "the server to start reading the body")
    counts = wait_for(lambda: diff(server_counts(serve_url), before) or None, 60, "the disconnect to be counted")
    assert counts == {"cancelled: client disconnected": 1}


def test_bench_exits_1_saying_why_when_no_request_finished(serve_url, tmp_path):
    deploy(serve_url, "pab", replicas=1)
    trace = bursty_trace(tmp_path / "t.jsonl", n=5, bursts=1)
    res = cli("bench", "--url", serve_url, "--trace", str(trace), "--model", "nope", "--out", str(tmp_path / "o"))
    assert res.returncode == 1, res.stderr
    assert "no request finished: 5 failed of 5" in res.stderr and "HTTP 400: model 'nope' is not served" in res.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["requests.csv", "summary.json"]


def test_bursty_trace_every_request_accounted_under_both_routers(serve_url, tmp_path):
    """Accounting, not speed: which router meets more SLOs depends on the machine's load (on 2 busy cores the
    default router has met more), so that comparison is measured in benchmarks/bench_ray_serve.py."""
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
        assert not [k for k in server_counts(serve_url) if any(c.isdigit() for c in k)]  # bounded keys
    pab, default = results["pab"], results["default"]
    met = {k: round(v["slo_attainment"] * v["requests"]) for k, v in results.items()}
    print(f"SLOs met: PAB {met['pab']}/240 ({pab['rejected']} refused), default {met['default']}/240")
    assert default["rejected"] == 0


STREAMED_S = 2.0  # how long the victim's streams run before the kill (the ingress sees their tokens late)


def test_replica_killed_mid_run_reroutes_unstarted_requests_and_fails_begun_streams_clearly(serve_url, tmp_path):
    import ray

    deploy(serve_url, "pab", admission="none", replicas=3)
    # Outputs long enough that one burst is still streaming when the next arrives and queues behind it.
    trace = bursty_trace(tmp_path / "bursty.jsonl", n=240, bursts=4, gap=1.5, outputs=(40, 80))
    before = server_counts(serve_url)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#NodeReplica#" in a["name"]]
    assert len(victims) == 3
    victim = ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"])
    seen: list[dict] = []
    replayed = threading.Event()

    def kill() -> None:
        """Kill the replica the moment its own report shows requests not yet started and streams that have run
        for STREAMED_S: a condition, so a slow machine only makes it come later. The replica counts a stream
        as begun once it has queued a token; on a loaded machine the ingress sees that token much later (one run
        beside a busy loop killed 6 such streams and the ingress re-routed them all, as it should: it had seen
        none begin), so the streams must have been running a while for the ingress to have seen them."""
        streaming_since = None
        while not replayed.is_set():
            stats = ray.get(victim.record_routing_stats.remote(), timeout=60)
            now = time.monotonic()
            if stats.get("streaming", 0) < 1:
                streaming_since = None
            elif streaming_since is None:
                streaming_since = now
            elif stats.get("unstarted", 0) >= 2 and now - streaming_since >= STREAMED_S:
                ray.kill(victim, no_restart=True)
                seen.append(stats)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill)
    try:
        s = bench(serve_url, trace, tmp_path / "kill", on_start=killer.start)
    finally:
        replayed.set()
        killer.join()
    assert seen, "the replica never held both running streams and unstarted requests"
    server = diff(server_counts(serve_url), before)
    print("killed at", seen, "server counts", server)
    assert sorted(s["ids"]) == sorted(f"bursty-{i}" for i in range(240)) and s["requests"] == 240
    failed = {k: v for k, v in s["outcomes"].items() if k != "finished"}
    # Streams that had begun end with a clear error; nothing else fails and nothing is silently dropped.
    assert failed and all(k.startswith("failed: request") and "its replica died after" in k for k in failed)
    assert sum(failed.values()) == server["failed: replica died mid-stream"]
    assert s["finished"] == server["finished"] == 240 - sum(failed.values())
    rerouted = server.get("rerouted: replica died before the first token", 0)
    print(f"replica killed: {sum(failed.values())} begun streams failed, {rerouted} unstarted requests re-routed")
    assert rerouted >= 1  # requests queued on the dead replica were sent again, and finished
