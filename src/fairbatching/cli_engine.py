"""The GPU engine's commands: `profile` (measure and fit a profile), `replay` (a workload in real time) and
`fit-profile` (fit measured rows). torch, and the library itself, load only when one of them runs."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from fairbatching.cli_options import (
    EngineArgs,
    PolicyOpt,
    PolicyOptionOpt,
    SloArgs,
    WideOpt,
    WorkloadArgs,
    console,
    grouped,
    out_console,
    save_summary,
)
from fairbatching.errors import FairBatchingError
from fairbatching.progress import Activity, progress_bar
from fairbatching.validate import atomic_write_text, check_output_dir, open_fraction, parse_policy_options

MaxContext = Annotated[int, typer.Option("--max-context", help="Longest sequence the engine serves (tokens)")]
# A CPU engine runs fp32 weights eagerly: past this size one step takes seconds and the weights tens of GB.
CPU_MAX_PARAMS = 1_500_000_000


def check_engine_device(command: str, e: EngineArgs) -> str:
    """The device ``command`` runs its engine on, checked before anything is built: without a CUDA GPU a GPU
    command says so at once (not after minutes building an 8B model on the CPU), and a CPU run happens only
    when asked for (``--device cpu``) with a model small enough for a CPU."""
    try:
        import torch
    except ImportError as exc:
        raise FairBatchingError(f"`{command}` runs the GPU engine, which needs the [gpu] extra: {exc}") from None
    device = e.device or "cuda"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FairBatchingError(
                f"`{command}` needs a CUDA GPU; found none (a CPU run of a small model: --device cpu --model tiny)"
            )
        return device
    if device != "cpu":
        raise FairBatchingError(f"--device {device!r}: use cuda, cuda:N or cpu")
    from fairbatching.engine.config import model_config

    params = model_config(e.model).num_params
    if params > CPU_MAX_PARAMS:
        raise FairBatchingError(
            f"--model {e.model}: {params / 1e9:.1f}B parameters is too large for a CPU run "
            f"(at most {CPU_MAX_PARAMS / 1e9:.1f}B); use --model tiny, or a layer slice such as {e.model}@2"
        )
    if e.num_blocks is None:
        raise FairBatchingError("--device cpu needs --num-blocks (the KV blocks to allocate, e.g. 400)")
    return device


def _planning_profile(model: str, device: str) -> str:
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
    name: Annotated[str, typer.Option("--name", help="Profile name")] = "measured",
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
    prof = replace(base_profile, name=name, source="measured", **fit)
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
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per composition (median)")] = 5,
    grid: Annotated[str, typer.Option("--grid", help="full, or quick (a few compositions, for a smoke test)")] = "full",
    name: Annotated[str | None, typer.Option("--name", help="Profile name (default: MODEL-DEVICE-measured)")] = None,
) -> None:
    """Measure batch latencies on the GPU engine, fit the cost model, and write a profile."""
    check_engine_device("profile", e)
    from fairbatching.core.modes import Grid, parse_mode
    from fairbatching.engine.profiler import default_grid, measured_profile, run_profile, write_rows_csv

    mode = parse_mode(Grid, grid, "--grid")
    check_output_dir(out)
    runner = _engine(e, max_context)
    compositions = default_grid(runner.pool.usable * e.block_size, max_context)
    if mode is Grid.QUICK:
        compositions = compositions[:: max(1, len(compositions) // 14)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with progress_bar(console, label_width=14) as bar:
        task = bar.add_task("profiling", total=len(compositions))
        rows = run_profile(runner, compositions, repeats, progress=lambda i, _n, _row: bar.update(task, completed=i))
    write_rows_csv(out / "rows.csv", rows)
    hardware = _hardware(runner)
    prof, report = measured_profile(
        runner,
        rows,
        name or f"{runner.model.config.name}-{hardware.split()[-1].lower()}-measured",
        f"fairbatching profile --model {e.model} --grid {grid}: {len(rows)} compositions on the GPU engine",
        {"device": hardware, "profiled_s": round(time.time() - start, 1)},
    )
    prof.save(out / "profile.json")
    out_console.print(
        f"{len(rows)} compositions in {time.time() - start:.0f} s; held-out MAPE {report.holdout_mape * 100:.2f}%, "
        f"max {report.holdout_max_error * 100:.2f}% -> {out / 'profile.json'}"
    )


@dataclass
class ReplicaArgs:
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, help="Engine replicas, one process per GPU, behind one router")
    ] = 1
    router: Annotated[str, typer.Option("--router", help="With --replicas: pab, round-robin, least-outstanding...")] = (
        "pab"
    )
    admission: Annotated[
        str, typer.Option("--admission", help="With --replicas and the pab router: none, reject or defer")
    ] = "none"

    def cluster_config(self, policy: str, profile: str | None, slo: SloArgs, options: dict) -> Any:
        """The replicas' cluster config, checked (router and admission too) before any engine is built."""
        from fairbatching.cluster.simulator import ClusterConfig, homogeneous

        if options:
            raise FairBatchingError("--policy-option with --replicas: replicas build their policy with its defaults")
        nodes = homogeneous(self.replicas, policy, profile)
        return ClusterConfig(nodes, slo.slo, router=self.router, admission=self.admission)


def _engine_cluster(e: EngineArgs, max_context: int, replicas: int) -> Any:
    try:
        from fairbatching.engine.cluster import EngineCluster, EngineSpec, replica_devices
    except ImportError as exc:
        raise FairBatchingError(f"the GPU engine needs the [gpu] extra: {exc}") from None
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
) -> None:
    """Replay a workload in real time on the GPU engine (--replicas N: GPUs 0..N-1 behind one router)."""
    device = check_engine_device("replay", e)
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.engine.loop import replay as replay_engine
    from fairbatching.metrics.summary import summarize
    from fairbatching.metrics.table import show, summary_table
    from fairbatching.policies import make_policy
    from fairbatching.runs import check_slo_feasible

    if out:
        check_output_dir(out)
    workload = w.spec().build()
    if profile is None:
        profile = _planning_profile(e.model, device)
    prof = load_profile(profile)
    check_slo_feasible(slo.slo, prof)
    options = parse_policy_options(policy_option or []).get(policy, {})
    cost = prof.cost_model()
    pol = make_policy(policy, cost, tpot_slo=slo.tpot, **options)
    config = r.cluster_config(policy, profile, slo, options) if r.replicas > 1 else None
    label = f"{policy} x{r.replicas}" if r.replicas > 1 else policy
    if config is None:
        runner = _engine(e, max_context)
        console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) with {label}")
        with progress_bar(console, label_width=14) as bar:
            step = functools.partial(_advance, bar, bar.add_task(policy, total=len(workload)))
            res = replay_engine(runner, pol, cost, workload, slo.slo, progress=step)
    else:
        console.print(f"starting {r.replicas} engine replicas (each builds and warms its engine)")
        with _engine_cluster(e, max_context, r.replicas) as cluster:
            console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) with {label}")
            with progress_bar(console, label_width=14) as bar:
                step = functools.partial(_advance, bar, bar.add_task(policy, total=len(workload)))
                res = cluster.replay(workload, config, progress=step)
    s = summarize(policy, workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
    if out:
        save_summary(s, out)
    show(out_console, summary_table([s], wide=wide))
