"""Command line: simulate/compare/capacity/sweep/evaluate/cluster on the simulator; profile/replay on the GPU engine.

Each command parses its options, calls the run layer or the evaluation, and prints. The library (numpy, the
simulator, plotting, scipy, Ray, torch) loads inside the commands that use it, so ``--help`` and a usage
error answer at once and a simulation starts without what it does not use.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from fairbatching import cli_engine
from fairbatching.cli_options import (
    POLICY_NAMES,
    NodeArgs,
    PoliciesOpt,
    PolicyOpt,
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
    fraction,
    non_negative,
    open_fraction,
    policy_names,
    positive,
    staged_dir,
)

if TYPE_CHECKING:
    from fairbatching.runs import Experiment, RunResult, RunSpec

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

TargetOpt = Annotated[float, typer.Option("--target", help="SLO attainment target", callback=fraction)]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Relative QPS tolerance", callback=open_fraction)]
BASELINES = "fairbatching,sarathi,vllm"
ALL_POLICIES = ",".join(POLICY_NAMES)


def _run_with_progress(exp: Experiment, policies: list[str]) -> list[RunResult]:
    results = []
    with progress_bar(console, label_width=14) as bar:
        for name in policies:
            task = bar.add_task(name, total=len(exp.workload))
            results.append(exp.run(name, lambda done, total, t=task: bar.update(t, completed=done)))
    return results


def _banner(exp: Experiment) -> None:
    st = exp.workload.stats()
    console.print(
        f"[bold]{exp.workload.name}[/]: {st['requests']} requests over {st['duration_s']:.0f} s "
        f"({st['qps']:.2f} req/s), prompt mean {st['prompt_mean']:.0f}, output mean {st['output_mean']:.0f} tokens; "
        f"SLO TTFT {exp.slo.ttft:g} s / TPOT {exp.slo.tpot * 1e3:g} ms; profile [bold]{exp.profile.name}[/] "
        f"({exp.profile.source})"
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
    from fairbatching.metrics.table import show, summary_table

    policy_names(policy)
    if out:
        check_output_dir(out)
    exp = build_experiment(w, slo, node)
    _banner(exp)
    (result,) = _run_with_progress(exp, [policy])
    s = result.summary
    if out:
        save_summary(s, out)
    if as_json:
        print(json.dumps({**exp.describe(), "summary": s.to_dict()}, indent=2))
    else:
        show(out_console, summary_table([s], wide=wide))


@app.command()
@grouped
def compare(
    *,
    policies: PoliciesOpt = ALL_POLICIES,
    w: WorkloadArgs,
    slo: SloArgs,
    node: NodeArgs,
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/compare"),
    wide: WideOpt = False,
) -> None:
    """Run several policies on the same workload; write tables, CSV/JSON and a plot + HTML report."""
    from fairbatching.metrics.table import show, summary_table
    from fairbatching.report.compare import write_comparison

    names = policy_names(policies)
    check_output_dir(out)
    exp = build_experiment(w, slo, node)
    _banner(exp)
    results = _run_with_progress(exp, names)
    summaries = [r.summary for r in results]
    with staged_dir(out) as tmp:
        png, report = write_comparison(tmp, exp.title, exp.describe(), summaries, [r.log for r in results])
    show(out_console, summary_table(summaries, title=exp.title, wide=wide))
    console.print(f"wrote {out}/summary.json, summary.csv, summary.md, requests_*.csv, {png.name}, {report.name}")


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
    out: Annotated[Path | None, typer.Option("--out", help="Write capacity.json here")] = None,
    under_test: UnderTestOpt = "fairbatching",
) -> None:
    """Highest request rate each policy sustains at the SLO-attainment target (bracketing + bisection)."""
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.evaluation.bounds import spec_bound
    from fairbatching.evaluation.capacity import capacity_lines, policy_capacities
    from fairbatching.runs import RunSpec, check_slo_feasible
    from fairbatching.workloads.families import family

    names = policy_names(policies)
    policy_names(under_test)
    if out:
        check_output_dir(out)
    fam = family(workload)
    if not fam.available():
        raise FairBatchingError(f"workload {workload!r} needs {fam.path()}, which is missing")
    sweeper = sw.sweeper()
    check_slo_feasible(slo.slo, load_profile(profile))
    base = RunSpec(names[0], workload, 1.0, 0, num, slo.ttft, slo.tpot, profile)
    bound = spec_bound(base, seeds)
    with Activity(console) as status:
        results = policy_capacities(base, names, sweeper, target, seeds, start, tolerance, console.print, status)
    for line in capacity_lines(results, bound, num, under_test):
        out_console.print(line)
    if out:
        with staged_dir(out) as tmp:
            data = {"workload": workload, "clairvoyant_qps": bound, "results": [asdict(r) for r in results]}
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
    from fairbatching.evaluation.grid import sweep_specs, write_sweep

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
    under_test: UnderTestOpt = "fairbatching",
) -> None:
    """The single-node evaluation: capacities, clairvoyant bounds, equal-load P99 TTFT, curves, slack."""
    from fairbatching.evaluation import evaluate as ev

    names = policy_names(policies)
    policy_names(under_test)
    parsed = ev.parse_scenarios(scenarios)
    check_output_dir(out)
    ev.check_scenarios(parsed, profile)
    sweeper = sw.sweeper()
    with Activity(console) as status:
        rows = ev.evaluate(
            parsed, names, sweeper, out, num, seeds, target, tolerance, profile, console.print, status, under_test
        )
        table, page, plots = ev.write_report(rows, parsed, names, out, num, target, profile, status)
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
    out: Annotated[Path | None, typer.Option("--out", help="Write cluster.json here")] = None,
    under_test: UnderTestOpt = "fairbatching",
) -> None:
    """Compare node-policy + router stacks on a simulated cluster (one load, or capacity with --capacity)."""
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.runs import ClusterShape, RunSpec, check_slo_feasible

    policy_names(under_test)
    shape = ClusterShape(nodes, "pab", report_interval, report_delay)
    base = RunSpec(under_test, workload, qps, 0, num, slo.ttft, slo.tpot, profile, cluster=shape)
    if out:
        check_output_dir(out)
    check_slo_feasible(slo.slo, load_profile(profile))
    _cluster(base, pairs, sw, find_capacity_, seeds, tolerance, out)


def _cluster(
    base: RunSpec, pairs: str, sw: SweepArgs, capacity: bool, seeds: int, tolerance: float, out: Path | None
) -> None:
    """``base.policy`` is the policy under test: the stacks of other policies are the baselines."""
    from fairbatching.evaluation import cluster as cl

    stacks = cl.cluster_stacks(pairs, base)
    sweeper = sw.sweeper()
    if capacity:
        rows = cl.stack_capacities(stacks, sweeper, seeds, tolerance, console.print, lambda: Activity(console))
        lines = cl.capacity_lines(rows, base.policy)
    else:
        with progress_bar(console, label_width=14) as bar:
            task = bar.add_task("cluster", total=len(stacks))
            results = sweeper.run(stacks, progress=lambda d, t: bar.update(task, completed=d, total=t))
        rows = cl.stack_runs(results)
        lines = [cl.run_line(r) for r in rows]
    for line in lines:
        out_console.print(line)
    if out:
        with staged_dir(out) as tmp:
            plots = cl.write_cluster(tmp, rows, base, capacity)
        for png in plots:
            console.print(f"wrote {out / png.name}")


@app.command(context_settings=HELP_UNSET)
def traces(
    as_json: Annotated[bool, typer.Option("--json", help="Print the shapes as JSON on stdout")] = False,
) -> None:
    """List the bundled traces (usable as `--trace NAME` and `-w NAME`) with their shape."""
    from fairbatching.metrics.table import shapes_table, show
    from fairbatching.workloads.bundled import NOTICE
    from fairbatching.workloads.traces import bundled_shapes

    shapes = bundled_shapes()
    if as_json:
        print(json.dumps(shapes, indent=2))
    else:
        show(out_console, shapes_table(shapes))
        console.print(f"sources, licenses and what was changed: {NOTICE}", markup=False)


@app.command(context_settings=HELP_UNSET)
def profiles() -> None:
    """List the bundled cost-model profiles."""
    from fairbatching.costmodel.profile import DEFAULT_PROFILE, available_profiles, load_profile

    for name in available_profiles():
        p = load_profile(name)
        default = " (default)" if name == DEFAULT_PROFILE else ""
        line = f"{name}{default}  [{p.source}]  KV {p.kv.capacity_tokens:,} tokens  {p.note[:80]}"
        out_console.print(line, markup=False)


@app.command(context_settings=HELP_UNSET)
def options() -> None:
    """List every policy's options (`-o policy.key=value`): default, type and range, and what each does."""
    from fairbatching.config import POLICY_CONFIGS, options_of

    for name, config in POLICY_CONFIGS.items():
        out_console.print(name, style="bold", markup=False)
        for opt in options_of(config).values():
            line = f"  {opt.name:22s} {json.dumps(opt.default):>6s}  {opt.describe()}: {opt.help}"
            out_console.print(line, markup=False, highlight=False)


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
        console.print("aborted")
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/] {escape(message)}")
    sys.exit(code)
