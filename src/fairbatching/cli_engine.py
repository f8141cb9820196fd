"""The GPU engine's commands: `profile` (measure and fit a profile), `replay` (a workload in real time) and
`fit-profile` (fit measured rows), and the GPU backend of the run layer's commands (`compare`, `capacity`:
``gpu_backend`` checks it, ``started_engines`` runs it). torch, and the library itself, load only when one of
them runs."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fairbatching.cli_options import (
    BackendArgs,
    EngineArgs,
    PolicyOpt,
    PolicyOptionOpt,
    PrefixCachingOpt,
    SloArgs,
    WideOpt,
    WorkloadArgs,
    console,
    grouped,
    out_console,
    save_summary,
)
from fairbatching.errors import ConfigError, FairBatchingError, install_hint
from fairbatching.progress import Activity, progress_bar
from fairbatching.validate import (
    at_least_one,
    atomic_write_text,
    check_output_dir,
    open_fraction,
    parse_policy_options,
)

if TYPE_CHECKING:
    from fairbatching.core.backend import EngineSpec

MaxContext = Annotated[int, typer.Option("--max-context", help="Longest sequence the engine serves (tokens)")]
CalibrationRequests = Annotated[
    int,
    typer.Option(
        "--calibration-requests",
        min=0,
        help="After the grid, replay this many Azure conversation requests per policy and refit on the served "
        "steps (the serving-calibrated profile); 0: the grid profile only",
    ),
]
ValidationRequests = Annotated[
    int,
    typer.Option(
        "--validation-requests",
        min=0,
        help="Then replay this many held-out Azure conversation requests (from request 9000) per policy at the "
        "profile's simulated capacity, and record the simulator against the engine in the profile "
        "(fit.validation); about 1 minute on an H200 at 200 (estimated); 0: skip",
    ),
]
# A CPU engine runs fp32 weights eagerly: past this size one step takes seconds and the weights tens of GB.
CPU_MAX_PARAMS = 1_500_000_000


def check_engine_device(command: str, e: EngineArgs, max_context: int) -> str:
    """The device ``command`` runs its engine on, checked (with the engine's sizes) before anything is built:
    without a CUDA GPU a GPU command says so at once (not after minutes building an 8B model on the CPU), and a
    CPU run happens only when asked for (``--device cpu``) with a model small enough for a CPU."""
    try:
        import torch
    except ImportError as exc:
        raise FairBatchingError(f"`{command}` runs the GPU engine: {install_hint('gpu')} ({exc})") from None
    from fairbatching.engine.config import check_engine_sizes, model_config

    check_engine_sizes(e.num_blocks, e.block_size, max_context)
    device = e.device or "cuda"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FairBatchingError(
                f"`{command}` needs a CUDA GPU; found none (a CPU run of a small model: --device cpu --model tiny)"
            )
        return device
    if device != "cpu":
        raise FairBatchingError(f"--device {device!r}: use cuda, cuda:N or cpu")
    params = model_config(e.model).num_params
    if params > CPU_MAX_PARAMS:
        raise FairBatchingError(
            f"--model {e.model}: {params / 1e9:.1f}B parameters is too large for a CPU run "
            f"(at most {CPU_MAX_PARAMS / 1e9:.1f}B); use --model tiny, or a layer slice such as {e.model}@2"
        )
    if e.num_blocks is None:
        raise FairBatchingError("--device cpu needs --num-blocks (the KV blocks to allocate, e.g. 400)")
    return device


@dataclass(frozen=True)
class GpuBackend:
    """A command's GPU backend, checked: the engine each replica builds, on which devices."""

    engine: EngineSpec
    devices: list[str | None]
    device: str


def gpu_backend(command: str, b: BackendArgs) -> GpuBackend | None:
    """None for the simulator; for ``--backend gpu`` the engines to start, checked before any work is done
    (no CUDA GPU, more GPUs asked for than present, a CPU run without ``--device cpu``: one line, exit 2)."""
    from fairbatching.core.backend import Backend, EngineSpec
    from fairbatching.core.modes import parse_mode

    if parse_mode(Backend, b.backend, "--backend") is Backend.SIM:
        _refuse_engine_options(b)
        return None
    device = check_engine_device(command, b, b.max_context)
    import torch

    from fairbatching.engine.cluster import replica_devices

    cuda = device.startswith("cuda")
    devices = replica_devices(b.gpus or (torch.cuda.device_count() if cuda else 1), device)
    hardware = torch.cuda.get_device_name(device) if cuda else "cpu"
    engine = EngineSpec(
        b.model, b.max_context, b.num_blocks, device=None if cuda else "cpu", block_size=b.block_size, hardware=hardware
    )
    return GpuBackend(engine, devices, device)


def _refuse_engine_options(b: BackendArgs) -> None:
    """The simulator builds no engine: an engine option set off its default would be ignored without a word.
    (Off its default, not given: typer 0.29 keeps click's parameter source private.)"""
    for f in fields(BackendArgs):
        value = getattr(b, f.name)
        if f.name != "backend" and value != f.default:
            raise ConfigError(f"--{f.name.replace('_', '-')} {value}: applies only to --backend gpu")


def backend_settings(gpu: GpuBackend) -> dict[str, Any]:
    """What a report records about the GPU backend it ran on."""
    from dataclasses import asdict

    return {"name": "gpu", "engines": len(gpu.devices), "engine": asdict(gpu.engine)}


@contextmanager
def started_engines(gpu: GpuBackend | None) -> Iterator[Any]:
    """The GPU backend's engines (one replica process per GPU, each built and warmed before any clock starts),
    stopped on the way out (at once on an error or Ctrl-C); None for the simulator."""
    if gpu is None:
        yield None
        return
    from fairbatching.engine.cluster import EngineCluster

    engines = f"{len(gpu.devices)} engine{'s' if len(gpu.devices) > 1 else ''}"
    start = time.time()
    with Activity(console) as status:
        status(f"starting {engines} ({gpu.engine.model} on {gpu.engine.hardware}), each warmed before use", 0, None)
        cluster = EngineCluster(gpu.engine, gpu.devices)
    console.print(f"{engines} ready in {time.time() - start:.0f} s: KV blocks {cluster.kv_blocks}")
    with cluster:
        yield cluster


def planning_profile(model: str, device: str) -> str:
    """With no --profile: one measured on this GPU model when bundled, else the default; the user is told which
    and why (a policy planning with another GPU's step times misjudges what fits in an SLO)."""
    from fairbatching.costmodel.profile import DEFAULT_PROFILE, profile_for_device
    from fairbatching.engine.config import model_config

    if device == "cpu":
        console.print(f"planning with profile {DEFAULT_PROFILE} (the default: no profile is measured on a CPU)")
        return DEFAULT_PROFILE
    import torch

    name, why = profile_for_device(model_config(model).name, torch.cuda.get_device_name(device))
    console.print(f"planning with profile {name}: {why}")
    return name


def _engine(e: EngineArgs, max_context: int) -> Any:
    """The engine, warmed (kernels compiled, graphs captured, KV sized after both) before any clock starts."""
    from fairbatching.engine import build_engine

    start = time.time()
    with Activity(console) as status:
        status(f"building and warming the engine ({e.model})", 0, None)
        runner = build_engine(
            e.model, device=e.device, num_blocks=e.num_blocks, block_size=e.block_size, max_context=max_context
        )
    kv_gib = runner.kv_cache.numel() * runner.kv_cache.element_size() / 2**30
    measured = f", warm-up took {runner.warmup_bytes / 2**30:.1f} GiB" if runner.warmup_bytes is not None else ""
    graphs = ", ".join(f"{n} {kind}" for kind, n in runner.graph_counts.items()) or "none"
    console.print(
        f"engine ready in {time.time() - start:.0f} s: {runner.pool.usable} KV blocks ({kv_gib:.1f} GiB){measured}; "
        f"graphs: {graphs}"
    )
    return runner


def fit_profile(
    rows: Annotated[
        Path, typer.Argument(help="Profile rows (CSV/JSON): new_tokens,context_tokens,num_seqs,attn_work,latency_s")
    ],
    out: Annotated[Path, typer.Option("--out", help="Profile JSON to write")],
    name: Annotated[str | None, typer.Option("--name", help="Profile name (default: the --out file's stem)")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Profile whose model, hardware and KV to keep")] = None,
    holdout: Annotated[
        float, typer.Option("--holdout", help="Fraction of rows held out", callback=open_fraction)
    ] = 0.2,
) -> None:
    """Fit the batch cost model to measured rows and save it as a profile."""
    from fairbatching.costmodel.fit import fit_cost_model, load_profile_rows
    from fairbatching.costmodel.profile import load_profile

    if out.is_dir():
        raise FairBatchingError(f"--out {out}: is a folder; give the profile JSON file to write")
    check_output_dir(out.parent)
    base_profile = load_profile(base)
    report = fit_cost_model(load_profile_rows(rows), holdout_fraction=holdout)
    fit = {"params": report.model.params, "fit": report.as_dict(), "note": f"fitted from {rows.name}"}
    prof = replace(base_profile, name=name or out.stem, source="measured", **fit)
    atomic_write_text(out, json.dumps(prof.to_json(), indent=2) + "\n")
    out_console.print(
        f"fitted {report.train_rows} rows; held-out MAPE {report.holdout_mape * 100:.2f}%, "
        f"max error {report.holdout_max_error * 100:.2f}% on {report.holdout_rows} rows -> {out}"
    )


@grouped
def profile(
    *,
    out: Annotated[Path, typer.Option("--out", help="Folder for rows.csv and profile.json")],
    e: EngineArgs,
    max_context: MaxContext = 32768,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed runs per composition (median)", callback=at_least_one)
    ] = 5,
    grid: Annotated[str, typer.Option("--grid", help="full, or quick (a few compositions, for a smoke test)")] = "full",
    name: Annotated[str | None, typer.Option("--name", help="Profile name (default: MODEL-DEVICE-measured)")] = None,
    calibration_requests: CalibrationRequests = 300,
    validation_requests: ValidationRequests = 200,
    slo: SloArgs,
) -> None:
    """Measure batch latencies on the GPU engine, fit the cost model, calibrate it on served steps (replays of a
    trace window, planned for the SLO), validate it on a held-out window, and write the profile: one command from
    a fresh GPU to a profile that says how far to trust it."""
    check_engine_device("profile", e, max_context)
    from fairbatching.core.modes import Grid, parse_mode
    from fairbatching.engine.profiler import default_grid
    from fairbatching.evaluation.calibrate import check_windows

    mode = parse_mode(Grid, grid, "--grid")
    check_windows(calibration_requests, validation_requests)
    check_output_dir(out)
    start = time.time()
    runner = _engine(e, max_context)
    compositions = default_grid(runner.pool.usable * e.block_size, max_context)
    if mode is Grid.QUICK:
        compositions = compositions[:: max(1, len(compositions) // 14)]
    grid_start = time.time()
    rows = _run_grid(runner, compositions, repeats)
    command = (
        f"fairbatching profile --model {e.model} --grid {grid} --calibration-requests {calibration_requests} "
        f"--validation-requests {validation_requests}"
    )
    prof, grid_line = _fit_grid(runner, rows, name, command, grid_start)
    cal = _calibrate(runner, prof, calibration_requests, slo.slo, command) if calibration_requests else None
    val = _validate(runner, prof if cal is None else cal.profile, validation_requests, slo.slo)
    _write_profile(out, rows, prof, cal, val, start)
    done = f"{grid_line} -> {out / 'profile.json'}"
    if cal is not None:
        done = (
            f"{grid_line}; serving-calibrated on {len(cal.steps)} served steps: held-out MAPE "
            f"{cal.report.holdout_mape * 100:.2f}% -> {out / 'profile.json'} (grid: grid_profile.json)"
        )
    out_console.print(done)
    if val is not None:
        out_console.print(f"validation: {val.record['verdict']}")


def _run_grid(runner: Any, compositions: list[Any], repeats: int) -> list[Any]:
    """The grid's rows (``engine.profiler.run_profile``), with a progress bar."""
    from fairbatching.engine.profiler import run_profile

    with progress_bar(console, label_width=14) as bar:
        task = bar.add_task("profiling", total=len(compositions))
        return run_profile(runner, compositions, repeats, progress=lambda i, _n, _row: bar.update(task, completed=i))


def _fit_grid(runner: Any, rows: list[Any], name: str | None, command: str, grid_start: float) -> tuple[Any, str]:
    """The grid's fitted profile, and the line (printed here) that says how well it fits."""
    from fairbatching.engine.profiler import measured_profile

    hardware = _hardware(runner)
    prof, report = measured_profile(
        runner,
        rows,
        name or f"{runner.model.config.name}-{hardware.split()[-1].lower()}-measured",
        f"{command}: {len(rows)} compositions on the GPU engine",
        {"device": hardware, "profiled_s": round(time.time() - grid_start, 1)},
    )
    grid_line = (
        f"grid: {len(rows)} compositions in {time.time() - grid_start:.0f} s; held-out MAPE "
        f"{report.holdout_mape * 100:.2f}%, max {report.holdout_max_error * 100:.2f}%"
    )
    console.print(grid_line)
    return prof, grid_line


def _write_profile(out: Path, rows: list[Any], grid: Any, cal: Any, val: Any, start: float) -> None:
    """``out``'s files, all or none: the grid's rows and the profile; when calibrated, the calibrated profile
    as profile.json, the grid's as grid_profile.json and the served steps beside; when validated, the
    validation in profile.json's fit and the held-out steps beside. Timed from ``start``."""
    from fairbatching.engine.profiler import write_rows_csv
    from fairbatching.evaluation.calibrate import STEP_COLUMNS
    from fairbatching.validate import staged_dir

    final = grid if cal is None else cal.profile
    if val is not None:
        final = replace(final, fit={**(final.fit or {}), "validation": val.record})
    if cal is not None or val is not None:
        final = replace(final, hardware={**final.hardware, "profiled_s": round(time.time() - start, 1)})
    with staged_dir(out) as tmp:
        write_rows_csv(tmp / "rows.csv", rows)
        if cal is not None:
            grid.save(tmp / "grid_profile.json")
        for steps, name in ((cal, "calibration_steps.csv"), (val, "validation_steps.csv")):
            if steps is not None:
                write_rows_csv(tmp / name, [dict(zip(STEP_COLUMNS, map(float, r), strict=True)) for r in steps.steps])
        final.save(tmp / "profile.json")


def _calibrate(runner: Any, grid: Any, requests: int, slo: Any, command: str) -> Any:
    """The serving calibration (``evaluation.calibrate``), with a progress bar per replay."""
    from fairbatching.evaluation.calibrate import POLICIES, calibrate, calibration_window

    with Activity(console) as status:
        status(f"simulating the grid profile's capacity on the first {requests} calibration requests", 0, None)
        window = calibration_window(grid, requests, runner.max_context, slo)
    console.print(
        f"calibration: the first {requests} {window.workload.name} requests replayed per policy at {window.qps} req/s"
    )
    with progress_bar(console, label_width=14) as bar:
        tasks = {p: bar.add_task(p, total=len(window.workload)) for p in POLICIES}
        return calibrate(
            runner, grid, window, slo, grid.name, command, lambda p, d, _t: bar.update(tasks[p], completed=d)
        )


def _validate(runner: Any, prof: Any, requests: int, slo: Any) -> Any:
    """The validation on a held-out window (``evaluation.calibrate.validate``), with a progress bar per replay;
    None when ``requests`` is 0."""
    if not requests:
        return None
    from fairbatching.evaluation.calibrate import POLICIES, validate, validation_window

    with Activity(console) as status:
        status(f"simulating {prof.name}'s capacity on {requests} held-out requests", 0, None)
        window = validation_window(prof, requests, runner.max_context, slo)
    console.print(
        f"validation: {requests} {window.workload.name} requests from {window.start} replayed per policy at "
        f"{window.qps} req/s (the profile's simulated capacity there: {window.sim_capacity_qps:.2f} req/s)"
    )
    with progress_bar(console, label_width=14) as bar:
        tasks = {p: bar.add_task(p, total=len(window.workload)) for p in POLICIES}
        return validate(runner, prof, window, slo, lambda p, d, _t: bar.update(tasks[p], completed=d))


@dataclass
class ReplicaArgs:
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, help="Engine replicas, one process per GPU, behind one router")
    ] = 1
    router: Annotated[str, typer.Option("--router", help="With --replicas: pab, round-robin, least-outstanding...")] = (
        "pab"
    )
    admission: Annotated[
        str,
        typer.Option(
            "--admission",
            help="none, reject or defer: refuse (or hold) at arrival what cannot make its TTFT; one engine: the "
            "node's own admission, with --replicas: the pab router's",
        ),
    ] = "none"

    def cluster_config(
        self, policy: str, profile: str | None, slo: SloArgs, options: dict, prefix_caching: bool = False
    ) -> Any:
        """The replicas' cluster config, checked (router and admission too) before any engine is built."""
        from fairbatching.cluster.simulator import ClusterConfig, homogeneous

        if options:
            raise FairBatchingError("--policy-option with --replicas: replicas build their policy with its defaults")
        nodes = homogeneous(self.replicas, policy, profile)
        return ClusterConfig(
            nodes, slo.slo, router=self.router, admission=self.admission, prefix_caching=prefix_caching
        )


def _engine_cluster(e: EngineArgs, max_context: int, replicas: int) -> Any:
    try:
        from fairbatching.engine.cluster import EngineCluster, EngineSpec, replica_devices
    except ImportError as exc:
        raise FairBatchingError(f"the GPU engine needs the [gpu] extra ({install_hint('gpu')}): {exc}") from None
    spec = EngineSpec(e.model, max_context, e.num_blocks, device=e.device, block_size=e.block_size)
    return EngineCluster(spec, replica_devices(replicas, e.device))


def _advance(bar: Any, task: Any, done: int, _total: int) -> None:
    bar.update(task, completed=done)


def _hardware(runner: Any) -> str:
    if runner.device.type != "cuda":
        return runner.device.type
    import torch

    return torch.cuda.get_device_name(runner.device)


@grouped
def replay(
    *,
    policy: PolicyOpt = "fairbatching",
    e: EngineArgs,
    max_context: MaxContext = 16384,
    w: WorkloadArgs,
    slo: SloArgs,
    profile: Annotated[str | None, typer.Option("--profile", help="Cost-model profile the policy plans with")] = None,
    policy_option: PolicyOptionOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
    wide: WideOpt = False,
    r: ReplicaArgs,
    prefix_caching: PrefixCachingOpt = False,
) -> None:
    """Replay a workload in real time on the GPU engine (--replicas N: GPUs 0..N-1 behind one router)."""
    device = check_engine_device("replay", e, max_context)
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.metrics.summary import summarize
    from fairbatching.metrics.table import show, summary_table
    from fairbatching.policies import make_policy
    from fairbatching.runs import check_slo_feasible

    if out:
        check_output_dir(out)
    workload = w.spec().build()
    if profile is None:
        profile = planning_profile(e.model, device)
    prof = load_profile(profile)
    check_slo_feasible(slo.slo, prof)
    options = parse_policy_options(policy_option or []).get(policy, {})
    cost = prof.cost_model()
    pol = make_policy(policy, cost, tpot_slo=slo.tpot, **options)
    config = r.cluster_config(policy, profile, slo, options, prefix_caching) if r.replicas > 1 else None
    label = f"{policy} x{r.replicas}" if r.replicas > 1 else policy
    if config is None:
        res = _replay_one(e, max_context, workload, policy, pol, cost, slo.slo, r.admission, prefix_caching)
    else:
        res = _replay_replicas(e, max_context, r.replicas, workload, policy, label, config)
    s = summarize(policy, workload.name, res.requests, res.end_time, res.busy_time, res.preemptions, prefix_caching)
    if out:
        save_summary(s, out)
    show(out_console, summary_table([s], wide=wide, refused=r.admission != "none"))


def _replay_one(
    e: EngineArgs,
    max_context: int,
    workload: Any,
    policy: str,
    pol: Any,
    cost: Any,
    slo: Any,
    admission: str,
    prefix_caching: bool,
) -> Any:
    """``replay`` on one engine, built here, with the node's own admission."""
    from fairbatching.engine.loop import replay as replay_engine

    runner = _engine(e, max_context)
    console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) with {policy}")
    with progress_bar(console, label_width=14) as bar:
        step = functools.partial(_advance, bar, bar.add_task(policy, total=len(workload)))
        return replay_engine(
            runner, pol, cost, workload, slo, progress=step, admission=admission, prefix_caching=prefix_caching
        )


def _replay_replicas(
    e: EngineArgs, max_context: int, replicas: int, workload: Any, policy: str, label: str, config: Any
) -> Any:
    """``replay`` on ``replicas`` engine processes behind the cluster ``config``'s router."""
    console.print(f"starting {replicas} engine replicas (each builds and warms its engine)")
    with _engine_cluster(e, max_context, replicas) as cluster:
        console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) with {label}")
        with progress_bar(console, label_width=14) as bar:
            step = functools.partial(_advance, bar, bar.add_task(policy, total=len(workload)))
            return cluster.replay(workload, config, progress=step)
