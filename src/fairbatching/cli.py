"""Command line: simulate/compare/capacity/sweep/evaluate/cluster on the simulator; profile/replay on the GPU engine.

Each command parses its options, calls the run layer or the evaluation, and prints. The library (numpy, the
simulator, plotting, scipy, Ray, torch) loads inside the commands that use it, so ``--help`` and a usage
error answer at once and a simulation starts without what it does not use.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from fairbatching import cli_engine
from fairbatching.cli_options import (
    POLICY_NAMES,
    AdmissionOpt,
    BackendArgs,
    NodeArgs,
    PoliciesOpt,
    PolicyOpt,
    PrefixCachingOpt,
    ProfileOpt,
    RequestsOpt,
    SeedsOpt,
    SloArgs,
    SweepArgs,
    UnderTestOpt,
    WideOpt,
    WorkloadArgs,
    WorkloadOpt,
    build_experiment,
    console,
    grouped,
    out_console,
    save_summary,
)
from fairbatching.errors import FairBatchingError
from fairbatching.progress import Activity, progress_bar
from fairbatching.validate import (
    at_least_one,
    check_output_dir,
    comma_items,
    fraction,
    non_negative,
    open_fraction,
    policy_names,
    positive,
    staged_dir,
    under_test_of,
)

if TYPE_CHECKING:
    from fairbatching.costmodel.profile import Profile
    from fairbatching.evaluation.capacity import CapacityResult
    from fairbatching.runs import ClusterShape, Experiment, RunResult, RunSpec

# typer (0.29) builds a pydantic validator for every option it is handed a value for, None included, so an
# unset --help flag (the top level's in `fairbatching simulate ...`) would import pydantic (~0.1 s) for
# nothing. Its default given as the bool it becomes skips that. Options a command reads still go through
# pydantic, so only the top level and the commands that take no value need this.
HELP_UNSET = {"default_map": {"help": False}}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="FairBatching: SLO-fair LLM batch scheduling.",
    context_settings=HELP_UNSET,
)

# Modules a compiled build (pyproject.toml, [tool.fairbatching] compiled) runs as C extensions: the scheduling
# hot path. `--version` says whether they were loaded compiled.
HOT_PATH = ("fairbatching.core.request", "fairbatching.policies.fairbatching", "fairbatching.serving.node")


def _print_version(asked: bool) -> None:
    if not asked:
        return
    import importlib
    from importlib.machinery import EXTENSION_SUFFIXES

    from fairbatching import __version__

    compiled = [m for m in HOT_PATH if str(importlib.import_module(m).__file__).endswith(tuple(EXTENSION_SUFFIXES))]
    if len(compiled) == len(HOT_PATH):
        build = "compiled (mypyc): the scheduling hot path runs as C extensions"
    elif compiled:
        build = f"partly compiled: only {', '.join(compiled)}"
    else:
        build = "pure Python (`pip install .` in the checkout compiles the hot path)"
    out_console.print(f"fairbatching {__version__}\nbuild: {build}", markup=False, highlight=False)
    raise typer.Exit()


@app.callback()
def _top(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and whether the compiled build is loaded", callback=_print_version
        ),
    ] = False,
) -> None:
    """The top level's own options: typer reads them from this callback's signature."""


TargetOpt = Annotated[float, typer.Option("--target", help="SLO attainment target", callback=fraction)]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Relative QPS tolerance", callback=open_fraction)]
BASELINES = "fairbatching,sarathi,vllm"
ALL_POLICIES = ",".join(POLICY_NAMES)


def _run_with_progress(exp: Experiment, policies: list[str]) -> list[RunResult]:
    with progress_bar(console, label_width=14) as bar:
        tasks = {name: bar.add_task(name, total=len(exp.workload)) for name in policies}
        return exp.run_all(policies, lambda name, done, _total: bar.update(tasks[name], completed=done))


def _banner(exp: Experiment, profile: str | None) -> None:
    """What is about to run, folded to the terminal; a profile read from a file is named by its path (a fitted
    profile's own name is often just "measured")."""
    from fairbatching.costmodel.profile import available_profiles

    st = exp.workload.stats()
    label = profile if profile and profile not in available_profiles() else exp.profile.name
    console.print(
        f"[bold]{escape(exp.workload.name)}[/]: {st['requests']} requests over {st['duration_s']:.0f} s "
        f"({st['qps']:.2f} req/s), prompt mean {st['prompt_mean']:.0f}, output mean {st['output_mean']:.0f} tokens; "
        f"SLO TTFT {exp.slo.ttft:g} s / TPOT {exp.slo.tpot * 1e3:g} ms; profile [bold]{escape(label)}[/] "
        f"({exp.profile.source})",
        soft_wrap=False,
    )


@app.command()
@grouped
def simulate(
    *,
    policy: PolicyOpt = "fairbatching",
    w: WorkloadArgs,
    slo: SloArgs,
    node: NodeArgs,
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
    wide: WideOpt = False,
) -> None:
    """Simulate one policy on one workload."""
    from fairbatching.metrics.table import show, show_classes, summary_table

    policy_names(policy)
    if out:
        check_output_dir(out)
    exp = build_experiment(w, slo, node)
    _banner(exp, node.profile)
    (result,) = _run_with_progress(exp, [policy])
    s = result.summary
    if out:
        save_summary(s, out)
    if as_json:
        print(json.dumps({**exp.describe(), "summary": s.to_dict()}, indent=2))
    else:
        show(out_console, summary_table([s], wide=wide, refused=node.admission != "none"))
        show_classes(out_console, [s], wide)


@app.command()
@grouped
def compare(
    *,
    policies: PoliciesOpt = ALL_POLICIES,
    w: WorkloadArgs,
    slo: SloArgs,
    node: NodeArgs,
    b: BackendArgs,
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/compare"),
    wide: WideOpt = False,
) -> None:
    """Run several policies on the same workload; write tables, CSV/JSON and a plot + HTML report
    (--backend gpu: real-time replays on the GPU engines, the simulator's prediction beside each number)."""
    from fairbatching.metrics.table import show, show_classes, summary_table
    from fairbatching.report.compare import sim_table, write_comparison

    names = policy_names(policies)
    check_output_dir(out)
    gpu = cli_engine.gpu_backend("compare", b)
    if gpu is not None and node.profile is None:
        node.profile = cli_engine.planning_profile(b.model, gpu.device)
    exp = build_experiment(w, slo, node)
    _banner(exp, node.profile)
    with cli_engine.started_engines(gpu) as engines:
        if engines is not None:
            exp = replace(exp, engines=engines, max_model_len=min(exp.max_model_len, b.max_context))
        results = _run_with_progress(exp, names)
    summaries = [r.summary for r in results]
    sims = None if gpu is None else [r.sim for r in results if r.sim is not None]
    settings = exp.describe() if gpu is None else {**exp.describe(), "backend": cli_engine.backend_settings(gpu)}
    with staged_dir(out) as tmp:
        png, report = write_comparison(tmp, exp.title, settings, summaries, [r.log for r in results], sims)
    show(out_console, summary_table(summaries, exp.title, wide, refused=node.admission != "none"))
    show_classes(out_console, summaries, wide)
    if sims is not None:
        show(out_console, sim_table(summaries, sims))
    files = "summary.json, summary.csv, summary.md" + (", sim_vs_gpu.csv" if sims is not None else "")
    console.print(f"wrote {out}/{files}, requests_*.csv, {png.name}, {report.name}", markup=False, soft_wrap=False)


@app.command()
@grouped
def capacity(
    *,
    policies: PoliciesOpt = BASELINES,
    workload: WorkloadOpt = "default",
    num: RequestsOpt = 2000,
    seeds: SeedsOpt = 3,
    target: TargetOpt = 0.9,
    tolerance: ToleranceOpt = 0.02,
    start: Annotated[float, typer.Option("--start-qps", help="First load to try", callback=positive)] = 8.0,
    slo: SloArgs,
    profile: ProfileOpt = None,
    sw: SweepArgs,
    b: BackendArgs,
    out: Annotated[Path | None, typer.Option("--out", help="Write capacity.json here")] = None,
    prefix_caching: PrefixCachingOpt = False,
    admission: AdmissionOpt = "none",
    under_test: UnderTestOpt = None,
) -> None:
    """Highest request rate each policy sustains at the SLO-attainment target (bracketing + bisection;
    --backend gpu: real-time replays from the simulated capacity on, the simulator beside each point;
    --admission: every policy behind the node's admission control, its refusals counted as missed)."""
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.evaluation.bounds import spec_bound
    from fairbatching.evaluation.capacity import capacity_lines, policy_capacities
    from fairbatching.runs import check_slo_feasible
    from fairbatching.workloads.families import family

    names = policy_names(policies)
    under = under_test_of(under_test, names)
    if out:
        check_output_dir(out)
    fam = family(workload)
    if not fam.available():
        raise FairBatchingError(f"workload {workload!r} needs {fam.path()}, which is missing")
    sweeper = sw.sweeper()
    gpu, profile = _gpu_and_profile("capacity", b, profile)
    check_slo_feasible(slo.slo, prof := load_profile(profile))
    base = _base_spec(names[0], workload, 1.0, num, slo, profile, gpu, prefix_caching, admission=admission)
    bound = spec_bound(base, seeds)
    with cli_engine.started_engines(gpu) as engines, Activity(console) as status:
        sweeper.engines = engines
        results = policy_capacities(base, names, sweeper, target, seeds, start, tolerance, console.print, status)
    check = None if gpu else _gpu_check(profile or prof.name, prof)
    if base.admission != "none":
        out_console.print(f"behind node admission {base.admission}: each policy's refused requests count as missed")
    for line in [*capacity_lines(results, bound, num, under), *([check] if check else [])]:
        out_console.print(line)
    if out:
        _write_capacity(out, {"workload": workload, "clairvoyant_qps": bound}, results, gpu, base, check)


def _gpu_and_profile(
    command: str, b: BackendArgs, profile: str | None
) -> tuple[cli_engine.GpuBackend | None, str | None]:
    """The GPU backend ``b`` asks for (None: the simulator), and the profile to plan with: with no --profile, on
    the GPU, the one planned for its engine."""
    gpu = cli_engine.gpu_backend(command, b)
    if gpu is not None and profile is None:
        profile = cli_engine.planning_profile(b.model, gpu.device)
    return gpu, profile


def _base_spec(
    policy: str,
    workload: str,
    qps: float,
    num: int,
    slo: SloArgs,
    profile: str | None,
    gpu: cli_engine.GpuBackend | None,
    prefix_caching: bool,
    cluster: ClusterShape | None = None,
    admission: str = "none",
) -> RunSpec:
    """The run a command varies (policy, load, seed), on the simulator or on ``gpu``'s engines, behind node
    ``admission``."""
    from fairbatching.core.backend import Backend
    from fairbatching.runs import RunSpec

    return RunSpec(
        policy,
        workload,
        qps,
        0,
        num,
        slo.ttft,
        slo.tpot,
        profile,
        admission=admission,
        cluster=cluster,
        backend=Backend.SIM if gpu is None else Backend.GPU,
        engine=None if gpu is None else gpu.engine,
        prefix_caching=prefix_caching,
    )


def _write_capacity(
    out: Path,
    data: dict[str, object],
    results: list[CapacityResult],
    gpu: cli_engine.GpuBackend | None,
    base: RunSpec,
    profile_check: str | None = None,
) -> None:
    """``capacity.json``: ``data``, the policies' results, and the backend, prefix caching and node admission
    of the search (``base``) where not the defaults, and the profile's GPU check where a simulated search has
    one to say."""
    with staged_dir(out) as tmp:
        data["results"] = [asdict(r) for r in results]
        if profile_check:
            data["profile_check"] = profile_check
        if gpu is not None:
            data["backend"] = cli_engine.backend_settings(gpu)
        if base.prefix_caching:
            data["prefix_caching"] = True
        if base.admission != "none":
            data["admission"] = str(base.admission)
        (tmp / "capacity.json").write_text(json.dumps(data, indent=2) + "\n")


@app.command()
@grouped
def sweep(
    *,
    policies: PoliciesOpt = BASELINES,
    workloads: Annotated[str, typer.Option("--workloads", help="Comma-separated families or trace paths")] = "default",
    loads: Annotated[str, typer.Option("--qps", help="Comma-separated load levels (req/s)")] = "12,14,16,17,18,19",
    slos: Annotated[str, typer.Option("--slos", help="Comma-separated TTFT:TPOT pairs in seconds")] = "2:0.1",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per point", callback=at_least_one)] = 1,
    num: RequestsOpt = 2000,
    profile: ProfileOpt = None,
    sw: SweepArgs,
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/sweep"),
) -> None:
    """Run policies x workloads x SLOs x loads in parallel (resumable), and plot latency against load."""
    from fairbatching.evaluation.grid import sweep_specs, sweep_tables, write_sweep
    from fairbatching.metrics.table import show

    names = policy_names(policies)
    check_output_dir(out)
    specs = sweep_specs(names, workloads, loads, slos, seeds, num, profile)
    sweeper = sw.sweeper()
    slo_count, load_count = len({(s.ttft_slo, s.tpot_slo) for s in specs}), len({s.qps for s in specs})
    grid = f"sweep {workloads} x {slo_count} SLOs x {load_count} loads x {len(names)} policies"
    with progress_bar(console) as bar:
        task = bar.add_task(grid, total=len(specs))
        results = sweeper.run(specs, progress=lambda done, total: bar.update(task, completed=done, total=total))
    with staged_dir(out) as tmp:
        plots = write_sweep(tmp, results)
    for table in sweep_tables(results):
        show(out_console, table)
    for png in plots:
        console.print(f"wrote {out / png.name}")
    console.print(f"{len(results)} runs -> {out}/sweep.json, sweep.csv")


@app.command()
@grouped
def evaluate(
    *,
    out: Annotated[Path, typer.Option("--out", help="Results folder")] = Path("out/evaluation"),
    policies: PoliciesOpt = BASELINES,
    scenarios: Annotated[
        str, typer.Option("--scenarios", help="workload:TTFT:TPOT:start_qps, comma-separated")
    ] = "default:2:0.1:8,default:1:0.05:8,azure-conv:2:0.1:8,azure-code:2:0.1:2,mooncake-conv:10:0.1:0.5",
    num: RequestsOpt = 2000,
    seeds: SeedsOpt = 3,
    target: TargetOpt = 0.9,
    tolerance: ToleranceOpt = 0.02,
    profile: ProfileOpt = None,
    sw: SweepArgs,
    b: BackendArgs,
    under_test: UnderTestOpt = None,
) -> None:
    """The single-node evaluation: capacities, clairvoyant bounds, equal-load P99 TTFT, curves, slack
    (--backend gpu: real-time replays from the simulated capacities on, the simulator beside each number)."""
    from fairbatching.evaluation import evaluate as ev

    names = policy_names(policies)
    under = under_test_of(under_test, names)
    parsed = ev.parse_scenarios(scenarios)
    check_output_dir(out)
    gpu, profile = _gpu_and_profile("evaluate", b, profile)
    ev.check_scenarios(parsed, profile)
    sweeper = sw.sweeper()
    engine = None if gpu is None else gpu.engine
    with cli_engine.started_engines(gpu) as engines, Activity(console) as status, staged_dir(out) as tmp:
        sweeper.engines = engines
        rows = ev.evaluate(
            parsed,
            names,
            sweeper,
            tmp,
            num,
            seeds,
            target,
            tolerance,
            profile,
            console.print,
            status,
            under,
            engine,
        )
        table, page, plots = ev.write_report(rows, parsed, names, tmp, num, target, profile, status, engine, engines)
    out_console.print(table)
    console.print(f"wrote {out}/evaluation.json, evaluation.md, {page.name} and {plots} plots")


@app.command()
@grouped
def cluster(
    *,
    pairs: Annotated[
        str, typer.Option("--pairs", help="policy:router[:admission] stacks to compare, comma-separated")
    ] = "vllm:round-robin,sarathi:least-outstanding,fairbatching:pab,fairbatching:pab:reject",
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes in the cluster", callback=at_least_one)] = 4,
    workload: WorkloadOpt = "default",
    qps: Annotated[float, typer.Option("--qps", help="Cluster-wide request rate", callback=positive)] = 70.0,
    num: RequestsOpt = 4000,
    report_interval: Annotated[
        float, typer.Option("--report-interval", help="Seconds between node reports", callback=positive)
    ] = 0.5,
    report_delay: Annotated[
        float, typer.Option("--report-delay", help="Seconds a report takes to arrive", callback=non_negative)
    ] = 0.0,
    find_capacity_: Annotated[bool, typer.Option("--capacity", help="Search each stack's capacity instead")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per load point (capacity)", callback=at_least_one)] = 2,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Relative QPS tolerance (capacity)", callback=open_fraction)
    ] = 0.03,
    slo: SloArgs,
    profile: ProfileOpt = None,
    sw: SweepArgs,
    b: BackendArgs,
    out: Annotated[Path | None, typer.Option("--out", help="Write cluster.json here")] = None,
    prefix_caching: PrefixCachingOpt = False,
    under_test: UnderTestOpt = None,
) -> None:
    """Compare node-policy + router stacks on a simulated cluster (one load, or capacity with --capacity;
    --backend gpu: one engine per node on the wall clock, the simulator beside each run)."""
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.runs import ClusterShape, check_slo_feasible

    run = [item.split(":")[0] for item in comma_items("--pairs", pairs)]
    under = under_test_of(under_test, run, "--pairs")
    if out:
        check_output_dir(out)
    on_nodes = replace(b, gpus=nodes) if b.gpus is None and b.backend != "sim" else b  # one engine per node
    gpu, profile = _gpu_and_profile("cluster", on_nodes, profile)
    if b.gpus is not None and b.gpus != nodes:
        raise FairBatchingError(f"--gpus {b.gpus} with --nodes {nodes}: a cluster on the GPU runs one engine per node")
    shape = ClusterShape(nodes, "pab", report_interval, report_delay)
    base = _base_spec(under or run[0], workload, qps, num, slo, profile, gpu, prefix_caching, cluster=shape)
    check_slo_feasible(slo.slo, load_profile(profile))
    with cli_engine.started_engines(gpu) as engines:
        _cluster(base, pairs, sw, find_capacity_, seeds, tolerance, out, under, engines)


def _cluster(
    base: RunSpec,
    pairs: str,
    sw: SweepArgs,
    capacity: bool,
    seeds: int,
    tolerance: float,
    out: Path | None,
    under_test: str | None,
    engines: object = None,
) -> None:
    """The stacks of policies other than ``under_test`` are the baselines (all of them, with none)."""
    from fairbatching.evaluation import cluster as cl
    from fairbatching.metrics.table import show

    stacks = cl.cluster_stacks(pairs, base)
    sweeper = sw.sweeper()
    sweeper.engines = engines
    title = cl.cluster_title(base, seeds if capacity else None)
    if capacity:
        rows = cl.stack_capacities(stacks, sweeper, seeds, tolerance, console.print, lambda: Activity(console))
        table = cl.capacity_table(rows, title, under_test)
    else:
        with progress_bar(console, label_width=14) as bar:
            task = bar.add_task("cluster", total=len(stacks))
            results = sweeper.run(stacks, progress=lambda d, t: bar.update(task, completed=d, total=t))
        rows = cl.stack_runs(results)
        table = cl.run_table(rows, title)
    show(out_console, table)
    if out:
        with staged_dir(out) as tmp:
            plots = cl.write_cluster(tmp, rows, base, capacity)
        for png in plots:
            console.print(f"wrote {out / png.name}")


@app.command(context_settings=HELP_UNSET)
def traces(
    as_json: Annotated[bool, typer.Option("--json", help="Print the shapes as JSON on stdout")] = False,
    wide: WideOpt = False,
) -> None:
    """List the bundled traces (usable as `--trace NAME` and `-w NAME`) with their shape."""
    from fairbatching.metrics.table import shapes_table, show
    from fairbatching.workloads.bundled import NOTICE
    from fairbatching.workloads.traces import bundled_shapes

    shapes = bundled_shapes()
    if as_json:
        print(json.dumps(shapes, indent=2))
    else:
        show(out_console, shapes_table(shapes, wide))
        console.print(f"sources, licenses and what was changed:\n  {NOTICE}", markup=False)


@app.command(context_settings=HELP_UNSET)
def profiles(
    files: Annotated[
        list[str] | None, typer.Argument(help="Profile JSON files to list too, e.g. out/profile/profile.json")
    ] = None,
    wide: WideOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every profile's name, note and validation")] = False,
) -> None:
    """List the bundled cost-model profiles (usable as `--profile NAME`) and any profile files given, each with
    the held-out validation it records (`fairbatching profile` runs one): how far its simulated SLO attainment
    was from the GPU's."""
    from fairbatching.costmodel.profile import DEFAULT_PROFILE, available_profiles, load_profile
    from fairbatching.metrics.table import Column, FittedTable, show

    names = [*available_profiles(), *(files or [])]
    loaded = [load_profile(name) for name in names]
    checks = [(p.fit or {}).get("validation") for p in loaded]
    if as_json:
        rows = zip(names, loaded, checks, strict=True)
        print(
            json.dumps(
                [{"profile": n, "source": p.source, "note": p.note, "validation": v} for n, p, v in rows], indent=2
            )
        )
        return
    table = FittedTable(
        [
            Column("profile", names, "name", "left"),
            Column("source", [p.source for p in loaded], justify="left"),
            Column("KV tokens", [f"{p.kv.capacity_tokens:,}" for p in loaded]),
            Column("validated", [_validated(v) for v in checks], justify="left"),
            Column("note", [p.note for p in loaded], "text", "left", drop=1),
        ],
        f"cost-model profiles (default: {DEFAULT_PROFILE})",
        wide,
    )
    show(out_console, table)


def _gpu_check(name: str, prof: Profile) -> str:
    """How far to trust a simulated capacity: what profile ``name`` (a bundled name or a file) records of its
    simulator against the GPU on replays it was not fitted on (`fairbatching profile` records it)."""
    check = (prof.fit or {}).get("validation")
    if not check:
        return f"profile {name} records no check against a GPU: its capacities are unvalidated estimates"
    return f"profile {name} against the GPU, as recorded: {check['verdict']}"


def _validated(check: dict | None) -> str:
    """A profile's validation in a table cell: passed or failed, and the largest gap between the simulated and
    the GPU's SLO attainment, in points (the verdict itself is in `profiles --json`)."""
    if not check:
        return "-"
    return f"{'passed' if check['passed'] else 'failed'}, {check['max_gap_pts']:.0f} pts"


@app.command(context_settings=HELP_UNSET)
def options(
    as_json: Annotated[bool, typer.Option("--json", help="Print the options as JSON on stdout")] = False,
) -> None:
    """List every policy's options (`-o policy.key=value`): default, type and range, and what each does."""
    from rich import box
    from rich.table import Table

    from fairbatching.config import POLICY_CONFIGS, options_of

    listed = {
        name: [
            {"option": o.name, "default": o.default, "range": o.describe(), "help": o.help}
            for o in options_of(config).values()
        ]
        for name, config in POLICY_CONFIGS.items()
    }
    if as_json:
        print(json.dumps(listed, indent=2))
        return
    for name, rows in listed.items():
        # Names and defaults whole; what each option does, and its range, wrap in the width that is left.
        table = Table(title=f"{name} (-o {name}.OPTION=VALUE)", box=box.SIMPLE_HEAD)
        table.add_column("option", style="bold", no_wrap=True)
        table.add_column("default", justify="right", no_wrap=True)
        table.add_column("what it does; range")
        for r in rows:
            table.add_row(r["option"], json.dumps(r["default"]), f"{r['help']}; {r['range']}")
        out_console.print(table)


@app.command("vllm-settings", context_settings=HELP_UNSET)
def vllm_settings(
    additional_config: Annotated[
        str | None, typer.Option("--additional-config", help="What you pass vLLM's --additional-config (JSON)")
    ] = None,
) -> None:
    """Check the vLLM scheduler's settings (FAIRBATCHING_* variables, the FAIRBATCHING_CONFIG file,
    --additional-config) in a second: vLLM reads them only after loading the model. Prints the effective
    settings, or the one line vLLM would stop with."""
    from fairbatching.integrations.vllm.settings import SchedulerSettings, json_mapping

    extra = None if additional_config is None else json_mapping(additional_config, "--additional-config")
    out_console.print(SchedulerSettings.load(additional_config=extra).describe(), markup=False)


def _serve_commands() -> None:
    from fairbatching.integrations.ray_serve import commands

    app.command()(commands.serve)
    app.command()(commands.bench)


app.command("fit-profile")(cli_engine.fit_profile)
app.command("profile")(cli_engine.profile)
app.command()(cli_engine.replay)
_serve_commands()


def main() -> None:
    try:
        code = app(standalone_mode=False)  # typer returns a typer.Exit's code, and 130 on Ctrl-C
    except FairBatchingError as exc:
        _fail(str(exc), 2)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value
        _fail(exc.format_message(), exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except OSError as exc:  # the machine, not the input: a full disk, a file removed under us
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1)
    if code == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or the group's SIGINT) while we say so
        console.print("aborted")
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/] {escape(message)}", emoji=False)  # ":1234:" in a value is no emoji code
    sys.exit(code)
