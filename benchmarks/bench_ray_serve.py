"""Ray Serve integration on this machine's CPU (run on demand: ``python benchmarks/bench_ray_serve.py``).

1. Router decision time: ``PABRequestRouter.choose_replicas`` (the Ray adapter plus the shared routing core:
   reports read and aged, replicas ranked, admission checked) and the ``on_request_routed`` count, per
   request, for 4/16/64 replicas with fresh reports.
2. Requests/s through one router: one ingress (so one router), 2 simulated replicas whose steps cost ~nothing
   (time scale 0.001), a closed loop of 64 clients sending 1-token non-streaming completions for 20 s;
   PAB against Ray's default power-of-two router.
3. PAB against the default router on the bursty trace of ``tests/test_ray_serve.py`` (240 requests, 4
   simulated H100 replicas at time scale 2, SLO 1 s / 100 ms wall), replayed by ``bench.replay``; repeats.
Writes ``results/benchmarks/ray_serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def decision_time(replicas: int, n: int = 20_000) -> float:
    """Microseconds per routed request through ``PABRequestRouter`` (choose + on_request_routed)."""
    from test_ray_serve import stats

    from fairbatching.integrations.ray_serve.router import PABRequestRouter

    router = PABRequestRouter.__new__(PABRequestRouter)  # no Ray deployment around it: the decision alone
    router.initialize_state(admission="reject", report_interval=0.5, report_delay=0.2)
    now = time.time()
    router._get_curr_time_s = lambda: now  # reports stay fresh however long the loop takes
    pool = [SimpleNamespace(replica_id=f"r{i}", routing_stats=stats(now, 10**9 + i)) for i in range(replicas)]

    async def run() -> float:
        pending = SimpleNamespace(
            args=[{"prompt_tokens": 1000, "arrival": now, "ttft": 60.0}],
            future=asyncio.get_running_loop().create_future(),
            routing_context=SimpleNamespace(should_backoff=False),
        )
        t0 = time.perf_counter()
        for _ in range(n):
            ranks = await router.choose_replicas(pool, pending)
            router.on_request_routed(pending, ranks[0][0].replica_id, None)
        return (time.perf_counter() - t0) / n * 1e6

    return asyncio.run(run())


async def closed_loop(url: str, clients: int, seconds: float) -> tuple[int, int]:
    import aiohttp

    body = {"prompt": [1, 2, 3, 4], "max_tokens": 1, "vllm_xargs": {"ttft_slo": 30.0}}
    ok = errors = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            nonlocal ok, errors
            while time.perf_counter() < stop:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    await resp.read()
                    ok, errors = (ok + 1, errors) if resp.status == 200 else (ok, errors + 1)

        await asyncio.gather(*(client() for _ in range(clients)))
    return ok, errors


def deploy(url: str, router: str, replicas: int, time_scale: float, slo) -> None:
    import test_ray_serve as t

    t.TIME_SCALE, t.TRACE_SLO = time_scale, slo
    t.deploy(url, router, "reject" if router == "pab" else "none", replicas)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="bursty-trace runs per router")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "ray_serve.json")
    args = ap.parse_args()
    import ray
    import test_ray_serve as t
    from ray import serve

    from fairbatching.core.request import SLO
    from fairbatching.integrations.ray_serve.bench import BenchOptions, replay
    from fairbatching.workloads.traces import load_trace

    out: dict = {"decision_us": {}, "throughput": {}, "bursty": {}}
    for n in (4, 16, 64):
        out["decision_us"][n] = round(decision_time(n), 1)
        print(f"decision, {n:3d} replicas: {out['decision_us'][n]:7.1f} us per request")

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = t.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        for router in ("pab", "default"):
            deploy(url, router, 2, 0.001, SLO(30.0, 1.0))
            ok, errors = asyncio.run(closed_loop(url, 64, 20.0))
            out["throughput"][router] = {"requests_per_s": round(ok / 20.0, 1), "errors": errors}
            print(f"throughput, {router:7s}: {ok / 20.0:6.1f} req/s ({errors} errors)")
        slo = SLO(1.0, 0.1)
        t.TIME_SCALE = 2.0
        trace = t.bursty_trace(args.out.parent / "bursty.jsonl")
        workload = load_trace(trace)
        trace.unlink()
        for router in ("pab", "default"):
            deploy(url, router, 4, 2.0, slo)
            runs = []
            for _ in range(args.repeats):
                s = asyncio.run(replay(workload, BenchOptions(url, slo))).summary(router, "bursty")
                runs.append(
                    {
                        "slo_met": round(s.slo_attainment * s.requests),
                        "refused": s.rejected,
                        "ttft_p50": s.ttft.p50,
                        "ttft_p99": s.ttft.p99,
                        "tpot_attainment": s.tpot_attainment,
                    }
                )
                print(f"bursty, {router:7s}: {runs[-1]}")
            out["bursty"][router] = runs
    finally:
        serve.shutdown()
        ray.shutdown()
    for router, runs in out["bursty"].items():
        met = [r["slo_met"] for r in runs]
        print(f"| {router} | {statistics.median(met)} / 240 ({min(met)}-{max(met)}) |")
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
