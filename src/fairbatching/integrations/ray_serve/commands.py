"""``fairbatching serve`` (simulated replicas behind the OpenAI endpoint on Ray Serve) and ``fairbatching
bench`` (trace replay against any OpenAI-compatible server). Ray and aiohttp are imported only when a
command runs, so the core install's CLI never needs them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fairbatching.config import DEFAULT_TPOT_S, DEFAULT_TTFT_S
from fairbatching.errors import ConfigError
from fairbatching.progress import progress_bar

console = Console(stderr=True, soft_wrap=True)
out_console = Console(width=None if sys.stdout.isatty() else 200)

Ttft = Annotated[float, typer.Option("--ttft-slo", help="TTFT SLO in seconds (default for requests without one)")]
Tpot = Annotated[float, typer.Option("--tpot-slo", help="TPOT SLO in seconds (default for requests without one)")]


def _need(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"this command needs {module}: pip install 'fairbatching[{extra}]'") from None


def serve(
    replicas: Annotated[int, typer.Option("--replicas", "-r", help="Simulated node replicas")] = 2,
    policy: Annotated[str, typer.Option("--policy", "-p", help="Node scheduling policy")] = "fairbatching",
    profile: Annotated[str | None, typer.Option("--profile", help="Cost-model profile (name or JSON)")] = None,
    router: Annotated[str, typer.Option("--router", help="pab, or default (Ray's power of two choices)")] = "pab",
    admission: Annotated[str, typer.Option("--admission", help="Router admission: none, reject, defer")] = "reject",
    node_admission: Annotated[
        str, typer.Option("--node-admission", help="Node-side PAB admission: none, reject, defer")
    ] = "none",
    ttft: Ttft = DEFAULT_TTFT_S,
    tpot: Tpot = DEFAULT_TPOT_S,
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="Wall seconds per profiled second (0.5: twice as fast)")
    ] = 1.0,
    report_interval: Annotated[float, typer.Option("--report-interval", help="Seconds between PAB reports")] = 0.5,
    report_delay: Annotated[float, typer.Option("--report-delay", help="Expected report delivery delay (s)")] = 0.2,
    model_name: Annotated[
        str, typer.Option("--model-name", help="Model name the endpoint serves")
    ] = "fairbatching-sim",
    host: Annotated[str, typer.Option("--host", help="HTTP bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="HTTP port")] = 8000,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to join (e.g. auto); default: start one here")
    ] = None,
) -> None:
    """Serve simulated FairBatching nodes behind an OpenAI-compatible /v1/completions on Ray Serve."""
    from fairbatching.core.request import SLO
    from fairbatching.integrations.ray_serve.node_server import NodeOptions

    slo = SLO(ttft, tpot)
    node = NodeOptions(policy, profile, slo, time_scale, node_admission)
    _check_node(node)
    _need("ray.serve", "serve")
    from fairbatching.integrations.ray_serve.app import ServeConfig, build_app

    config = ServeConfig(replicas, node, router, admission, report_interval, report_delay, model_name)
    import ray
    from ray import serve as ray_serve

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(build_app(config), name="fairbatching", route_prefix="/")
        console.print(
            f"serving {model_name}: {replicas} x {policy} replicas, {router} router (admission {admission}) "
            f"at http://{host}:{port}/v1/completions; Ctrl-C stops"
        )
        while True:
            time.sleep(3600)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def _check_node(node) -> None:
    """Build one node here first, so a bad policy, profile or option stops before Ray starts."""
    from fairbatching.integrations.ray_serve.node_server import NodeServer

    NodeServer(node)


def bench(
    url: Annotated[str, typer.Option("--url", help="Server base URL, e.g. http://127.0.0.1:8000")],
    trace: Annotated[Path | None, typer.Option("--trace", help="Trace file (default: the embedded workload)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Trace format: auto, azure, burstgpt, mooncake")] = "auto",
    num: Annotated[int | None, typer.Option("--num-requests", "-n", help="Use this many requests")] = None,
    start: Annotated[int, typer.Option("--start", help="Skip this many requests of the trace first")] = 0,
    qps: Annotated[float | None, typer.Option("--qps", help="Rescale arrivals to this mean rate")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the embedded workload and the prompt tokens")] = 0,
    ttft: Ttft = DEFAULT_TTFT_S,
    tpot: Tpot = DEFAULT_TPOT_S,
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: the server's first)")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one request may take")] = 600.0,
    label: Annotated[str, typer.Option("--label", help="Name of this run in the table")] = "bench",
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
) -> None:
    """Replay a trace against an OpenAI-compatible server; TTFT, TPOT, TBT, SLO attainment and goodput."""
    from fairbatching.core.request import SLO
    from fairbatching.runs import WorkloadSpec

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, got {url!r}")
    if timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {timeout}")
    slo = SLO(ttft, tpot)
    workload = WorkloadSpec(str(trace) if trace else None, fmt, num, start, qps, seed).build()
    _need("aiohttp", "serve")
    import asyncio

    from fairbatching.integrations.ray_serve.bench import BenchOptions, replay
    from fairbatching.metrics.table import summary_table

    console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) against {url}")
    with progress_bar(console, label_width=10) as bar:
        task = bar.add_task(label, total=len(workload))
        result = asyncio.run(
            replay(workload, BenchOptions(url, slo, model, timeout, seed), lambda d, _t: bar.update(task, completed=d))
        )
    summary = result.summary(label, workload.name)
    outcomes = result.outcomes()
    out_console.print(summary_table([summary]))
    for outcome, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        out_console.print(f"{n:7d}  {outcome}", markup=False)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        data = {**summary.to_dict(), "url": url, "model": result.model, "outcomes": dict(outcomes)}
        (out / "summary.json").write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
        summary.write_requests_csv(out / "requests.csv")
