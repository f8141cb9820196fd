"""``fairbatching serve`` (simulated replicas behind the OpenAI endpoint on Ray Serve) and ``fairbatching
bench`` (trace replay against any OpenAI-compatible server). Ray and aiohttp are imported only when a
command runs, so the core install's CLI never needs them."""

from __future__ import annotations

import errno
import json
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fairbatching.cli_options import PrefixCachingOpt, grouped
from fairbatching.config import DEFAULT_TPOT_S, DEFAULT_TTFT_S
from fairbatching.errors import ConfigError, install_hint
from fairbatching.progress import progress_bar
from fairbatching.validate import at_least_one, check_output_dir, non_negative, positive, staged_dir

console = Console(stderr=True, soft_wrap=True)
out_console = Console(width=None if sys.stdout.isatty() else 200)

Ttft = Annotated[
    float,
    typer.Option("--ttft-slo", help="TTFT SLO in seconds (default for requests without one)", callback=positive),
]
Tpot = Annotated[
    float,
    typer.Option("--tpot-slo", help="TPOT SLO in seconds (default for requests without one)", callback=positive),
]


Replicas = Annotated[int, typer.Option("--replicas", "-r", help="Simulated node replicas", callback=at_least_one)]
TimeScale = Annotated[
    float, typer.Option("--time-scale", help="Wall seconds per profiled second (0.5: twice as fast)", callback=positive)
]
ReportInterval = Annotated[
    float, typer.Option("--report-interval", help="Seconds between PAB reports", callback=positive)
]
ReportDelay = Annotated[
    float, typer.Option("--report-delay", help="Expected report delivery delay (s)", callback=non_negative)
]
BenchRequests = Annotated[
    int | None, typer.Option("--num-requests", "-n", help="Use this many requests", callback=at_least_one)
]
BenchStart = Annotated[
    int, typer.Option("--start", help="Skip this many requests of the trace first", callback=non_negative)
]
BenchQps = Annotated[float | None, typer.Option("--qps", help="Rescale arrivals to this mean rate", callback=positive)]
BenchSeed = Annotated[
    int, typer.Option("--seed", help="Seed of the embedded workload and the prompt tokens", callback=non_negative)
]


def _need(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"this command needs {module}: {install_hint(extra)}") from None


@dataclass
class ListenArgs:
    """Where the endpoint listens, and how long SIGTERM lets requests in flight finish."""

    host: Annotated[str, typer.Option("--host", help="HTTP bind address")] = "127.0.0.1"
    port: Annotated[int, typer.Option("--port", help="HTTP port", min=1, max=65535)] = 8000
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to join (e.g. auto); default: start one here")
    ] = None
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout", help="On SIGTERM, seconds in-flight requests may finish", callback=non_negative
        ),
    ] = 5.0


@dataclass
class LimitArgs:
    """What one request may ask of the endpoint (``protocol.Limits``)."""

    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 above)", min=1024)
    ] = 4 << 20  # mirrors protocol.Limits (not imported: --help stays light)
    body_timeout: Annotated[
        float,
        typer.Option("--body-timeout", help="Seconds a request body may take to arrive (408 after)", callback=positive),
    ] = 10.0
    max_slo: Annotated[
        float,
        typer.Option("--max-slo", help="Largest ttft_slo / tpot_slo a request may ask for (s)", callback=positive),
    ] = 600.0


@grouped
def serve(
    *,
    replicas: Replicas = 2,
    policy: Annotated[str, typer.Option("--policy", "-p", help="Node scheduling policy")] = "fairbatching",
    profile: Annotated[str | None, typer.Option("--profile", help="Cost-model profile (name or JSON)")] = None,
    router: Annotated[
        str, typer.Option("--router", help="pab, pab-affinity, prefix-affinity, default (Ray's)")
    ] = "pab",
    admission: Annotated[
        str | None,
        typer.Option("--admission", help="Router admission: none, reject, defer (default: reject with pab*)"),
    ] = None,
    node_admission: Annotated[
        str, typer.Option("--node-admission", help="Node-side PAB admission: none, reject, defer")
    ] = "none",
    prefix_caching: PrefixCachingOpt = False,
    ttft: Ttft = DEFAULT_TTFT_S,
    tpot: Tpot = DEFAULT_TPOT_S,
    time_scale: TimeScale = 1.0,
    report_interval: ReportInterval = 0.5,
    report_delay: ReportDelay = 0.2,
    model_name: Annotated[
        str, typer.Option("--model-name", help="Model name the endpoint serves")
    ] = "fairbatching-sim",
    listen: ListenArgs,
    lim: LimitArgs,
) -> None:
    """Serve simulated FairBatching nodes behind an OpenAI-compatible /v1/completions on Ray Serve.

    SIGTERM drains (new requests get 503, those in flight get --drain-timeout to finish) and exits 0;
    Ctrl-C stops at once (130)."""
    from fairbatching.core.request import SLO
    from fairbatching.integrations.ray_serve.node_server import NodeOptions

    slo = SLO(ttft, tpot)
    node = NodeOptions(policy, profile, slo, time_scale, node_admission, prefix_caching=prefix_caching)
    _check_node(node)
    _need("ray.serve", "serve")
    from fairbatching.integrations.ray_serve.app import ServeConfig, build_app
    from fairbatching.integrations.ray_serve.protocol import Limits

    limits = Limits(lim.max_body_bytes, lim.body_timeout, lim.max_slo)
    config = ServeConfig(replicas, node, router, admission, report_interval, report_delay, model_name, limits=limits)
    config.checker()  # the profile's floors, before Ray starts
    host, port = listen.host, listen.port
    _check_listen(host, port, probe=listen.address is None)
    _serve_until_sigterm(lambda: build_app(config), listen, _banner(config, host, port))


def _banner(config: Any, host: str, port: int) -> str:
    """What ``serve`` says once it is up: what serves, where, and how to stop it."""
    c = config
    return (
        f"serving {c.model_name}: {c.replicas} x {c.node.policy} replicas, {c.router} router (admission "
        f"{c.admission}{', prefix caching' if c.node.prefix_caching else ''}) at http://{host}:{port}/v1/completions; "
        "SIGTERM drains and stops, Ctrl-C stops at once"
    )


def _serve_until_sigterm(app: Callable[[], Any], listen: ListenArgs, banner: str) -> None:
    """Start Ray, run ``app()`` on Ray Serve (``banner`` said once it is up) until SIGTERM, drain it, and stop
    Ray (Ctrl-C: at once)."""
    import ray
    from ray import serve as ray_serve

    stop = threading.Event()
    # Only what serving needs: no dashboard (its agent still runs: Ray's metrics and runtime envs need it).
    ray.init(address=listen.address, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())  # after ray.init, which sets its own
    try:
        ray_serve.start(http_options={"host": listen.host, "port": listen.port})
        ray_serve.run(app(), name="fairbatching", route_prefix="/")
        console.print(banner)
        while not stop.wait(0.5):
            pass
        console.print(f"SIGTERM: draining (up to {listen.drain_timeout:g} s)")
        _drain(ray_serve, listen.drain_timeout)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def _drain(ray_serve: Any, timeout: float) -> None:
    """Ask the ingress to drain, and say how the requests in flight ended (or that it could not)."""
    try:
        ingress = ray_serve.get_app_handle("fairbatching")
        result = ingress.drain.remote(timeout).result(timeout_s=timeout + 30)
    except Exception as exc:  # the ingress is gone or stuck: stopping is still the right answer to SIGTERM
        console.print(f"drain did not complete ({type(exc).__name__}: {exc}); stopping", markup=False)
    else:
        n, cut = result["in_flight"], result["cut"]
        console.print(f"drained: {n - cut} of {n} requests in flight finished, {cut} ended with a shutdown error")


def _check_listen(host: str, port: int, probe: bool) -> None:
    """``host`` must resolve; with ``probe``, ``host:port`` must be free to listen on here (Ray's proxy sets
    SO_REUSEPORT, so a second server on a taken port would otherwise share it silently)."""
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host}: not a host name or address ({exc})") from None
    if not probe:
        return
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {host} (another server is listening)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine") from None
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def _check_node(node) -> None:
    """Build one node here first, so a bad policy, profile or option stops before Ray starts."""
    from fairbatching.integrations.ray_serve.node_server import NodeServer

    NodeServer(node)


def bench(
    url: Annotated[str, typer.Option("--url", help="Server base URL, e.g. http://127.0.0.1:8000")],
    trace: Annotated[Path | None, typer.Option("--trace", help="Trace file (default: the embedded workload)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Trace format: auto, azure, burstgpt, mooncake")] = "auto",
    num: BenchRequests = None,
    start: BenchStart = 0,
    qps: BenchQps = None,
    seed: BenchSeed = 0,
    ttft: Ttft = DEFAULT_TTFT_S,
    tpot: Tpot = DEFAULT_TPOT_S,
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: the server's first)")] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds one request may take", callback=positive)
    ] = 600.0,
    label: Annotated[str, typer.Option("--label", help="Name of this run in the table")] = "bench",
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
) -> None:
    """Replay a trace against an OpenAI-compatible server; TTFT, TPOT, TBT, SLO attainment and goodput."""
    from fairbatching.core.request import SLO
    from fairbatching.runs import WorkloadSpec

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, got {url!r}")
    if out is not None:
        _check_bench_out(out)
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
        _write_bench(out, summary, {"url": url, "model": result.model, "outcomes": dict(outcomes)})
    if workload.requests and not outcomes.get("finished"):
        console.print(f"[red]error:[/] no request finished: {_why_none_finished(outcomes)}")
        raise typer.Exit(1)


BENCH_OUTPUTS = ("summary.json", "requests.csv")


def _write_bench(out: Path, summary: Any, about: dict[str, Any]) -> None:
    """``BENCH_OUTPUTS`` in ``out``, both or neither: the summary with ``about`` the run, and every request."""
    with staged_dir(out) as tmp:
        data = {**summary.to_dict(), **about}
        (tmp / "summary.json").write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
        summary.write_requests_csv(tmp / "requests.csv")


def _check_bench_out(out: Path) -> None:
    """Before anything is sent: ``out`` must be a folder we can write, whose outputs are files if they exist."""
    check_output_dir(out)
    for name in BENCH_OUTPUTS:
        if (out / name).exists() and not (out / name).is_file():
            raise ConfigError(f"--out {out}: {out / name} exists and is not a file")


def _why_none_finished(outcomes: Counter[str]) -> str:
    """``outcomes`` (none finished) summed by kind, and the most common reasons."""
    kinds = Counter()
    for outcome, n in outcomes.items():
        kinds[outcome.split(":", 1)[0]] += n
    total = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    reasons = "; ".join(f"{n} x {outcome}" for outcome, n in outcomes.most_common(3))
    return f"{total} of {sum(outcomes.values())} (most common: {reasons})"
