"""Command line: simulate/compare/capacity/sweep/evaluate/cluster on the simulator; profile/replay on the GPU engine."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import available_profiles, load_profile
from fairbatching.errors import FairBatchingError
from fairbatching.experiment import DEFAULT_QPS, DEFAULT_SLO, Experiment, WorkloadSpec, check_slo_feasible
from fairbatching.integrations.ray_serve import commands as serve_commands
from fairbatching.metrics.table import markdown_table, show, summary_table, write_summary_csv
from fairbatching.policies import POLICIES
from fairbatching.progress import Activity, progress_bar
from fairbatching.validate import (
    at_least_one,
    atomic_write_text,
    check_output_dir,
    check_policy_options,
    fraction,
    non_negative,
    open_fraction,
    positive,
    positive_list,
    staged_dir,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="FairBatching: SLO-fair LLM batch scheduling.")
console = Console(stderr=True, soft_wrap=True)
out_console = Console(width=None if sys.stdout.isatty() else 200)

TraceOpt = Annotated[
    Path | None,
    typer.Option(
        "--trace",
        help="Bundled trace name (see `traces`) or a trace file (Azure CSV, BurstGPT CSV, Mooncake JSONL; .gz too); "
        "default: embedded",
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="Trace format: auto, azure, burstgpt, mooncake")]
NumOpt = Annotated[
    int | None,
    typer.Option("--num-requests", "-n", help="Use this many requests (default: all / 2000)", callback=at_least_one),
]
StartOpt = Annotated[
    int, typer.Option("--start", help="Skip this many requests of the trace first", callback=non_negative)
]
QpsOpt = Annotated[
    float | None,
    typer.Option(
        "--qps", help=f"Rescale arrivals to this mean rate (default workload: {DEFAULT_QPS})", callback=positive
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the synthetic default workload", callback=non_negative)]
TtftOpt = Annotated[float, typer.Option("--ttft-slo", help="TTFT SLO in seconds")]
TpotOpt = Annotated[float, typer.Option("--tpot-slo", help="TPOT SLO in seconds")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile name or JSON path (see `profiles`)")]
TimeoutOpt = Annotated[
    float | None, typer.Option("--queue-timeout", help="Drop requests waiting longer (s)", callback=positive)
]
MaxLenOpt = Annotated[
    int, typer.Option("--max-model-len", help="Reject requests longer than this (tokens)", callback=at_least_one)
]
PolicyOpt = Annotated[
    list[str] | None,
    typer.Option("--policy-option", "-o", help="policy.key=value, e.g. sarathi.token_budget=2048 (repeatable)"),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Show every column (files always carry them all)")]
AdmissionOpt = Annotated[
    str, typer.Option("--admission", help="Node admission control on the PAB: none, reject or defer")
]


def _experiment(
    trace: Path | None,
    fmt: str,
    num: int | None,
    start: int,
    qps: float | None,
    seed: int,
    ttft: float,
    tpot: float,
    profile: str | None,
    timeout: float | None,
    max_len: int,
    admission: str = "none",
    policy_options: list[str] | None = None,
) -> Experiment:
    options = _parse_policy_options(policy_options or [])
    workload = WorkloadSpec(str(trace) if trace else None, fmt, num, start, qps, seed).build()
    if workload.meta.get("skipped_rows"):
        console.print(f"note: skipped {workload.meta['skipped_rows']} trace rows of failed requests (zero tokens)")
    return Experiment(workload, load_profile(profile), SLO(ttft, tpot), max_len, timeout, admission, options)


def _parse_policy_options(items: list[str]) -> dict[str, dict]:
    """``policy.key=value`` pairs; values are read as JSON where they parse (numbers, true, null), else text."""
    out: dict[str, dict] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        policy, dot, key = head.partition(".")
        if not (eq and dot and key) or policy not in POLICIES:
            raise FairBatchingError(f"--policy-option takes policy.key=value with a policy of {', '.join(POLICIES)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(policy, {})[key] = value
    for policy, options in out.items():
        check_policy_options(policy, options)
    return out


def _progress() -> Progress:
    return progress_bar(console, label_width=14)


def _run_with_progress(exp: Experiment, policies: list[str]) -> list:
    results = []
    with _progress() as bar:
        for name in policies:
            task = bar.add_task(name, total=len(exp.workload))
            results.append(exp.run(name, lambda done, total, t=task: bar.update(t, completed=done)))
    return results


def _describe(exp: Experiment) -> dict:
    return {
        "workload": {"name": exp.workload.name, **exp.workload.stats(), **exp.workload.meta},
        "profile": {"name": exp.profile.name, "source": exp.profile.source, "note": exp.profile.note},
        "slo": asdict(exp.slo),
        "kv_blocks": exp.profile.kv.num_blocks,
    }


def _banner(exp: Experiment) -> None:
    st = exp.workload.stats()
    console.print(
        f"[bold]{exp.workload.name}[/]: {st['requests']} requests over {st['duration_s']:.0f} s "
        f"({st['qps']:.2f} req/s), prompt mean {st['prompt_mean']:.0f}, output mean {st['output_mean']:.0f} tokens; "
        f"SLO TTFT {exp.slo.ttft:g} s / TPOT {exp.slo.tpot * 1e3:g} ms; profile [bold]{exp.profile.name}[/] "
        f"({exp.profile.source})"
    )


@app.command()
def simulate(
    policy: Annotated[str, typer.Option("--policy", "-p", help=f"One of: {', '.join(POLICIES)}")] = "fairbatching",
    trace: TraceOpt = None,
    fmt: FormatOpt = "auto",
    num: NumOpt = None,
    start: StartOpt = 0,
    qps: QpsOpt = None,
    seed: SeedOpt = 0,
    ttft: TtftOpt = DEFAULT_SLO.ttft,
    tpot: TpotOpt = DEFAULT_SLO.tpot,
    profile: ProfileOpt = None,
    timeout: TimeoutOpt = None,
    max_len: MaxLenOpt = 131072,
    admission: AdmissionOpt = "none",
    policy_option: PolicyOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
    wide: WideOpt = False,
) -> None:
    """Simulate one policy on one workload."""
    _policy_names(policy)
    if out:
        check_output_dir(out)
    exp = _experiment(
        trace, fmt, num, start, qps, seed, ttft, tpot, profile, timeout, max_len, admission, policy_option
    )
    _banner(exp)
    (result,) = _run_with_progress(exp, [policy])
    s = result.summary
    if out:
        with staged_dir(out) as tmp:
            s.write_json(tmp / "summary.json")
            s.write_requests_csv(tmp / "requests.csv")
    if as_json:
        print(json.dumps({**_describe(exp), "summary": s.to_dict()}, indent=2))
    else:
        show(out_console, summary_table([s], wide=wide))


@app.command()
def compare(
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies")] = ",".join(POLICIES),
    trace: TraceOpt = None,
    fmt: FormatOpt = "auto",
    num: NumOpt = None,
    start: StartOpt = 0,
    qps: QpsOpt = None,
    seed: SeedOpt = 0,
    ttft: TtftOpt = DEFAULT_SLO.ttft,
    tpot: TpotOpt = DEFAULT_SLO.tpot,
    profile: ProfileOpt = None,
    timeout: TimeoutOpt = None,
    max_len: MaxLenOpt = 131072,
    admission: AdmissionOpt = "none",
    policy_option: PolicyOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/compare"),
    wide: WideOpt = False,
) -> None:
    """Run several policies on the same workload; write tables, CSV/JSON and a plot + HTML report."""
    from fairbatching.report import plot_comparison, write_html_report

    names = _policy_names(policies)
    check_output_dir(out)
    exp = _experiment(
        trace, fmt, num, start, qps, seed, ttft, tpot, profile, timeout, max_len, admission, policy_option
    )
    _banner(exp)
    results = _run_with_progress(exp, names)
    summaries = [r.summary for r in results]
    title = f"{exp.workload.name} @ {exp.workload.qps:.2f} req/s, SLO {exp.slo.ttft:g} s / {exp.slo.tpot * 1e3:g} ms"
    settings = _describe(exp)
    with staged_dir(out) as tmp:
        (tmp / "summary.json").write_text(
            json.dumps({**settings, "results": [s.to_dict() for s in summaries]}, indent=2) + "\n"
        )
        write_summary_csv(summaries, tmp / "summary.csv")
        (tmp / "summary.md").write_text(f"{title}\n\n{markdown_table(summaries)}\n")
        for s in summaries:
            s.write_requests_csv(tmp / f"requests_{s.policy}.csv")
        png = plot_comparison(summaries, [r.sim.log for r in results], tmp / "compare.png", title)
        report = write_html_report(tmp / "report.html", title, summaries, [png], settings)
    show(out_console, summary_table(summaries, title=title, wide=wide))
    console.print(f"wrote {out}/summary.json, summary.csv, summary.md, requests_*.csv, {png.name}, {report.name}")


def _sweeper(cache: Path, workers: int | None, ray: str | None):
    from fairbatching.evaluation import Sweeper

    check_output_dir(cache, "--cache")
    return Sweeper(cache, workers, ray)


CacheOpt = Annotated[Path, typer.Option("--cache", help="Result cache folder (makes sweeps resumable)")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Local worker processes (default: all cores)", callback=at_least_one)
]
RayOpt = Annotated[
    str | None, typer.Option("--ray", help="Run on a Ray cluster at this address ('local' starts one here)")
]


SeedsOpt = Annotated[int, typer.Option("--seeds", help="Seeds (trace windows) per load point", callback=at_least_one)]
TargetOpt = Annotated[float, typer.Option("--target", help="SLO attainment target", callback=fraction)]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Relative QPS tolerance", callback=open_fraction)]


@app.command()
def capacity(
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies")] = "fairbatching,sarathi,vllm",
    workload: Annotated[str, typer.Option("--workload", "-w", help="Family name or trace path")] = "default",
    num: Annotated[int, typer.Option("--num-requests", "-n", help="Requests per run", callback=at_least_one)] = 2000,
    seeds: SeedsOpt = 3,
    target: TargetOpt = 0.9,
    tolerance: ToleranceOpt = 0.02,
    start: Annotated[float, typer.Option("--start-qps", help="First load to try", callback=positive)] = 8.0,
    ttft: TtftOpt = DEFAULT_SLO.ttft,
    tpot: TpotOpt = DEFAULT_SLO.tpot,
    profile: ProfileOpt = None,
    cache: CacheOpt = Path("out/cache"),
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write capacity.json here")] = None,
) -> None:
    """Highest request rate each policy sustains at the SLO-attainment target (bracketing + bisection)."""
    from fairbatching.evaluation import RunSpec, family, find_capacity
    from fairbatching.evaluation.bounds import windows_capacity

    names = _policy_names(policies)
    if out:
        check_output_dir(out)
    fam = family(workload)
    if not fam.available():
        raise FairBatchingError(f"workload {workload!r} needs {fam.path()}, which is missing")
    sweeper = _sweeper(cache, workers, ray)
    prof = load_profile(profile)
    check_slo_feasible(SLO(ttft, tpot), prof)
    # On the same windows (seeds) the search runs; None where they are too short for a throughput bound.
    bound = windows_capacity([fam.build(1.0, s, num) for s in range(seeds)], prof)
    results = []
    with Activity(console) as status:
        for name in names:
            base = RunSpec(name, workload, 1.0, 0, num, ttft, tpot, profile)
            console.print(f"[bold]{name}[/] on {workload}: searching (target {target:.0%}, tolerance {tolerance:.0%})")
            res = find_capacity(
                base,
                sweeper,
                target,
                seeds,
                start,
                tolerance,
                on_point=lambda p: console.print(_point_line(p)),
                progress=lambda q, d, t, name=name: status(f"{name} {workload} @ {q:.2f} req/s", d, t),
            )
            results.append(res)
    best_base = max((r.capacity_qps for r in results if r.policy != "fairbatching"), default=0.0)
    for r in results:
        gain = (
            f" ({r.capacity_qps / best_base - 1:+.1%} vs best baseline)"
            if r.policy == "fairbatching" and best_base
            else ""
        )
        of_bound = ""
        if bound:  # the bound holds for sustained load; a window that finishes as one burst can beat it
            of_bound = (
                f"  {r.capacity_qps / bound:5.1%} of the clairvoyant bound"
                if r.capacity_qps <= bound
                else "  above the bound"
            )
        out_console.print(
            f"{r.policy:14s} capacity {r.capacity_qps:7.3f} req/s  bracket [{r.bracket[0]:.3f}, {r.bracket[1]:.3f}]"
            f"{of_bound}{gain}"
        )
    if bound:
        out_console.print(f"{'clairvoyant':14s} bound    {bound:7.3f} req/s (GPU 100% busy, latency ignored)")
        if any(r.capacity_qps > bound for r in results):
            out_console.print(
                f"a capacity above the bound means {num} requests are too few to load the GPU for long: raise -n"
            )
    else:
        out_console.print(
            f"no clairvoyant bound: in {num} requests one output's sequential decode steps, not GPU throughput, "
            "set the minimum time (use more requests)"
        )
    if out:
        with staged_dir(out) as tmp:
            (tmp / "capacity.json").write_text(
                json.dumps(
                    {"workload": workload, "clairvoyant_qps": bound, "results": [asdict(r) for r in results]},
                    indent=2,
                )
                + "\n"
            )


@app.command()
def sweep(
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies")] = "fairbatching,sarathi,vllm",
    workloads: Annotated[str, typer.Option("--workloads", help="Comma-separated families or trace paths")] = "default",
    loads: Annotated[str, typer.Option("--qps", help="Comma-separated load levels (req/s)")] = "12,14,16,17,18,19",
    slos: Annotated[str, typer.Option("--slos", help="Comma-separated TTFT:TPOT pairs in seconds")] = "2:0.1",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per point", callback=at_least_one)] = 1,
    num: Annotated[int, typer.Option("--num-requests", "-n", help="Requests per run", callback=at_least_one)] = 2000,
    profile: ProfileOpt = None,
    cache: CacheOpt = Path("out/cache"),
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/sweep"),
) -> None:
    """Run policies x workloads x SLOs x loads in parallel (resumable), and plot latency against load."""
    from fairbatching.evaluation import RunSpec
    from fairbatching.report.curves import plot_load_curves

    names = _policy_names(policies)
    check_output_dir(out)
    qps_levels = positive_list("--qps", loads)
    try:
        slo_pairs = [tuple(float(x) for x in pair.split(":")) for pair in slos.split(",") if pair.strip()]
    except ValueError:
        raise FairBatchingError(f"--slos takes TTFT:TPOT pairs of numbers, e.g. 2:0.1,1:0.05; got {slos!r}") from None
    if any(len(p) != 2 for p in slo_pairs):
        raise FairBatchingError("--slos takes TTFT:TPOT pairs, e.g. --slos 2:0.1,1:0.05")
    prof = load_profile(profile)
    for ttft, tpot in slo_pairs:
        check_slo_feasible(SLO(ttft, tpot), prof)
    specs = [
        RunSpec(p, w, q, s, num, ttft, tpot, profile)
        for w in [x.strip() for x in workloads.split(",") if x.strip()]
        for ttft, tpot in slo_pairs
        for q in qps_levels
        for p in names
        for s in range(seeds)
    ]
    sweeper = _sweeper(cache, workers, ray)
    grid = f"sweep {workloads} x {len(slo_pairs)} SLOs x {len(qps_levels)} loads x {len(names)} policies"
    with progress_bar(console) as bar:
        task = bar.add_task(grid, total=len(specs))
        results = sweeper.run(specs, progress=lambda done, total: bar.update(task, completed=done, total=total))
    rows = [
        (
            r["spec"]["workload"],
            r["spec"]["ttft_slo"],
            r["spec"]["tpot_slo"],
            r["spec"]["qps"],
            r["spec"]["seed"],
            r["spec"]["policy"],
            r["summary"]["ttft"]["p99"],
            r["summary"]["tpot"]["p99"],
            r["summary"]["tpot_attainment"],
            r["summary"]["slo_attainment"],
        )
        for r in results
    ]
    header = "workload,ttft_slo,tpot_slo,qps,seed,policy,ttft_p99,tpot_p99,tpot_attainment,slo_attainment"
    groups = sorted({(r[0], r[1], r[2]) for r in rows})
    with staged_dir(out) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "sweep.csv").write_text(header + "\n" + "\n".join(",".join(map(str, row)) for row in rows) + "\n")
        for w, ttft, tpot in groups:
            part = [
                r
                for r in results
                if (r["spec"]["workload"], r["spec"]["ttft_slo"], r["spec"]["tpot_slo"]) == (w, ttft, tpot)
            ]
            png = plot_load_curves(
                part, tmp / f"curves_{Path(w).name}_{ttft:g}_{tpot:g}.png", f"{w}, SLO {ttft:g} s / {tpot * 1e3:g} ms"
            )
            console.print(f"wrote {out / png.name}")
    console.print(f"{len(results)} runs -> {out}/sweep.json, sweep.csv")


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Results folder")] = Path("out/evaluation"),
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated policies")] = "fairbatching,sarathi,vllm",
    scenarios: Annotated[
        str, typer.Option("--scenarios", help="workload:TTFT:TPOT:start_qps, comma-separated")
    ] = "default:2:0.1:8,default:1:0.05:8,azure-conv:2:0.1:8,azure-code:2:0.1:2,mooncake-conv:10:0.1:0.5",
    num: Annotated[int, typer.Option("--num-requests", "-n", help="Requests per run", callback=at_least_one)] = 2000,
    seeds: SeedsOpt = 3,
    target: TargetOpt = 0.9,
    tolerance: ToleranceOpt = 0.02,
    profile: ProfileOpt = None,
    cache: CacheOpt = Path("out/cache"),
    workers: WorkersOpt = None,
    ray: RayOpt = None,
) -> None:
    """The single-node evaluation: capacities, clairvoyant bounds, equal-load P99 TTFT, curves, slack."""
    from fairbatching.evaluation import family
    from fairbatching.evaluation.evaluate import Scenario, equal_load_plots, markdown
    from fairbatching.evaluation.evaluate import evaluate as run_evaluation
    from fairbatching.report.html import write_html_page

    names = _policy_names(policies)
    try:
        parsed = [
            Scenario(w, float(t), float(p), float(q))
            for w, t, p, q in (item.strip().split(":") for item in scenarios.split(",") if item.strip())
        ]
    except ValueError:
        raise FairBatchingError("--scenarios takes workload:TTFT:TPOT:start_qps items, e.g. default:2:0.1:8") from None
    check_output_dir(out)
    prof = load_profile(profile)
    for sc in parsed:
        check_slo_feasible(SLO(sc.ttft, sc.tpot), prof)
        positive_list("--scenarios start_qps", str(sc.start_qps))
        family(sc.workload)
    sweeper = _sweeper(cache, workers, ray)
    with Activity(console) as status:
        rows = run_evaluation(
            parsed, names, sweeper, out, num, seeds, target, tolerance, profile, log=console.print, status=status
        )
        first = parsed[0]
        ref = next((r["equal_load_qps"] for r in rows if r["workload"] == first.workload), None)
        images = sorted(out.glob("curves_*.png"))
        if ref:
            images.extend(equal_load_plots(first, ref, names, out, num, profile, status))
    table = markdown(rows)
    note = f"Profile: {prof.name} ({prof.source}). Target {target:.0%} of requests meeting TTFT and TPOT."
    atomic_write_text(out / "evaluation.md", f"{note}\n\n{table}\n")
    page = write_html_page(
        out / "report.html", "FairBatching single-node evaluation", f"<p>{note}</p><pre>{table}</pre>", images
    )
    out_console.print(table)
    console.print(f"wrote {out}/evaluation.json, evaluation.md, {page.name} and {len(images)} plots")


@app.command()
def cluster(
    pairs: Annotated[
        str, typer.Option("--pairs", help="policy:router[:admission] stacks to compare, comma-separated")
    ] = "vllm:round-robin,sarathi:least-outstanding,fairbatching:pab,fairbatching:pab:reject",
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes in the cluster", callback=at_least_one)] = 4,
    workload: Annotated[str, typer.Option("--workload", "-w", help="Family name or trace path")] = "default",
    qps: Annotated[float, typer.Option("--qps", help="Cluster-wide request rate", callback=positive)] = 70.0,
    num: Annotated[int, typer.Option("--num-requests", "-n", help="Requests per run", callback=at_least_one)] = 4000,
    report_interval: Annotated[
        float, typer.Option("--report-interval", help="Seconds between node reports", callback=positive)
    ] = 0.5,
    report_delay: Annotated[
        float, typer.Option("--report-delay", help="Seconds a report takes to arrive", callback=non_negative)
    ] = 0.0,
    find_capacity_: Annotated[
        bool, typer.Option("--capacity", help="Search each stack's capacity instead of one run")
    ] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per load point (capacity)", callback=at_least_one)] = 2,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Relative QPS tolerance (capacity)", callback=open_fraction)
    ] = 0.03,
    ttft: TtftOpt = DEFAULT_SLO.ttft,
    tpot: TpotOpt = DEFAULT_SLO.tpot,
    profile: ProfileOpt = None,
    cache: CacheOpt = Path("out/cache"),
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write cluster.json here")] = None,
) -> None:
    """Compare node-policy + router stacks on a simulated cluster (one load, or capacity with --capacity)."""
    from fairbatching.evaluation import ClusterRunSpec, find_capacity

    if out:
        check_output_dir(out)
    check_slo_feasible(SLO(ttft, tpot), load_profile(profile))
    stacks = []
    for item in [p.strip() for p in pairs.split(",") if p.strip()]:
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise FairBatchingError(f"--pairs takes policy:router[:admission], got {item!r}")
        _policy_names(parts[0])
        stacks.append(
            ClusterRunSpec(
                parts[0],
                parts[1],
                workload,
                qps,
                0,
                nodes,
                num,
                ttft,
                tpot,
                parts[2] if len(parts) == 3 else "none",
                report_interval,
                report_delay,
                profile,
            )
        )
    from fairbatching.cluster import make_router

    for s in stacks:
        make_router(s.router, admission=s.admission != "none")  # fail fast on a bad stack, before any run
    sweeper = _sweeper(cache, workers, ray)
    rows = []
    if find_capacity_:
        for s in stacks:
            console.print(f"[bold]{s.label}[/] on {nodes} nodes, {workload}: searching")
            what = f"{s.label} x{nodes} {workload} @ {{:.2f}} req/s"
            with Activity(console) as status:
                res = find_capacity(
                    s,
                    sweeper,
                    0.9,
                    seeds,
                    qps,
                    tolerance,
                    on_point=lambda p: console.print(_point_line(p)),
                    progress=lambda q, d, t, what=what: status(what.format(q), d, t),
                )
            rows.append(
                {
                    "stack": s.label,
                    "capacity_qps": res.capacity_qps,
                    "bracket": res.bracket,
                    "curve": [asdict(p) for p in res.curve],
                }
            )
        base = max((r["capacity_qps"] for r in rows if not r["stack"].startswith("fairbatching")), default=0.0)
        for r in rows:
            gain = f"  ({r['capacity_qps'] / base - 1:+.1%} vs best baseline stack)" if base else ""
            out_console.print(f"{r['stack']:34s} capacity {r['capacity_qps']:8.2f} req/s{gain}")
    else:
        with _progress() as bar:
            task = bar.add_task("cluster", total=len(stacks))
            results = sweeper.run(stacks, progress=lambda d, t: bar.update(task, completed=d, total=t))
        for s, r in zip(stacks, results, strict=True):
            m = r["summary"]
            rows.append(
                {
                    "stack": s.label,
                    **{
                        k: m[k]
                        for k in (
                            "slo_attainment",
                            "ttft_attainment",
                            "tpot_attainment",
                            "goodput_rps",
                            "rejected",
                            "preemptions",
                        )
                    },
                    "ttft_p99": m["ttft"]["p99"],
                    "tpot_p99": m["tpot"]["p99"],
                }
            )
            out_console.print(
                f"{s.label:34s} SLO ok {m['slo_attainment']:6.1%}  P99 TTFT {m['ttft']['p99']:7.2f} s  "
                f"TPOT ok {m['tpot_attainment']:6.1%}  goodput {m['goodput_rps']:7.2f} req/s  rejected {m['rejected']}"
            )
    if out:
        with staged_dir(out) as tmp:
            if find_capacity_:
                from fairbatching.report.curves import plot_capacity_curves

                png = plot_capacity_curves(rows, tmp / "capacity_curves.png", f"{nodes} nodes, {workload}")
                console.print(f"wrote {out / png.name}")
            (tmp / "cluster.json").write_text(
                json.dumps({"nodes": nodes, "workload": workload, "rows": rows}, indent=2) + "\n"
            )


def _point_line(p) -> str:
    seeds = ", ".join(f"{v:.1%}" for v in p.per_seed)
    return (
        f"  {p.qps:8.3f} req/s  attainment {p.attainment:6.1%}  (seeds {seeds})"
        f"  P99 TTFT {p.p99_ttft:.2f} s  TPOT ok {p.tpot_attainment:.1%}"
    )


def _policy_names(policies: str) -> list[str]:
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        names = ", ".join(map(repr, unknown)) or "(none)"
        raise FairBatchingError(f"unknown policy {names}; choose from {', '.join(POLICIES)}")
    return names


@app.command("fit-profile")
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
    from dataclasses import replace

    from fairbatching.costmodel.fit import fit_cost_model, load_profile_rows

    if out.is_dir():
        raise FairBatchingError(f"--out {out}: is a folder; give the profile JSON file to write")
    check_output_dir(out.parent)
    base_profile = load_profile(base)
    report = fit_cost_model(load_profile_rows(rows), holdout_fraction=holdout)
    prof = replace(
        base_profile,
        name=name,
        source="measured",
        params=report.model.params,
        fit=report.as_dict(),
        note=f"fitted from {rows.name}",
    )
    atomic_write_text(out, json.dumps(prof.to_json(), indent=2) + "\n")
    out_console.print(
        f"fitted {report.train_rows} rows; held-out MAPE {report.holdout_mape * 100:.2f}%, "
        f"max error {report.holdout_max_error * 100:.2f}% on {report.holdout_rows} rows -> {out}"
    )


EngineModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Preset (llama-3-8b, llama-3.2-1b, ...), preset@LAYERS, or checkpoint dir")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda if available)")]
BlocksOpt = Annotated[int | None, typer.Option("--num-blocks", help="KV blocks (default: 90% of free GPU memory)")]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Tokens per KV block")]
MaxContextOpt = Annotated[int, typer.Option("--max-context", help="Longest sequence the engine serves (tokens)")]


def _engine(model: str, device: str | None, num_blocks: int | None, block_size: int, max_context: int):
    try:
        from fairbatching.engine import build_engine
    except ImportError as exc:
        raise FairBatchingError(f"the GPU engine needs the [gpu] extra: {exc}") from None
    return build_engine(model, device=device, num_blocks=num_blocks, block_size=block_size, max_context=max_context)


@app.command("profile")
def profile_engine(
    out: Annotated[Path, typer.Option("--out", help="Folder for rows.csv and profile.json")],
    model: EngineModelOpt = "llama-3-8b",
    device: DeviceOpt = None,
    num_blocks: BlocksOpt = None,
    block_size: BlockSizeOpt = 16,
    max_context: MaxContextOpt = 32768,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per composition (median)")] = 5,
    grid: Annotated[str, typer.Option("--grid", help="full, or quick (a few compositions, for a smoke test)")] = "full",
    name: Annotated[str | None, typer.Option("--name", help="Profile name (default: MODEL-DEVICE-measured)")] = None,
) -> None:
    """Measure batch latencies on the GPU engine, fit the cost model, and write a profile."""
    import time

    from fairbatching.engine.profiler import default_grid, measured_profile, run_profile, write_rows_csv

    if grid not in ("full", "quick"):
        raise FairBatchingError(f"--grid must be full or quick, got {grid!r}")
    check_output_dir(out)
    runner = _engine(model, device, num_blocks, block_size, max_context)
    compositions = default_grid(runner.pool.usable * block_size, max_context)
    if grid == "quick":
        compositions = compositions[:: max(1, len(compositions) // 14)]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with _progress() as bar:
        task = bar.add_task("profiling", total=len(compositions))
        rows = run_profile(runner, compositions, repeats, progress=lambda i, _n, _row: bar.update(task, completed=i))
    write_rows_csv(out / "rows.csv", rows)
    hardware = runner.device.type
    if runner.device.type == "cuda":
        import torch

        hardware = torch.cuda.get_device_name(runner.device)
    prof, report = measured_profile(
        runner,
        rows,
        name or f"{runner.model.config.name}-{hardware.split()[-1].lower()}-measured",
        f"fairbatching profile --model {model} --grid {grid}: {len(rows)} compositions on the GPU engine",
        {"device": hardware, "profiled_s": round(time.time() - start, 1)},
    )
    prof.save(out / "profile.json")
    out_console.print(
        f"{len(rows)} compositions in {time.time() - start:.0f} s; held-out MAPE {report.holdout_mape * 100:.2f}%, "
        f"max {report.holdout_max_error * 100:.2f}% -> {out / 'profile.json'}"
    )


@app.command()
def replay(
    policy: Annotated[str, typer.Option("--policy", "-p", help=f"One of: {', '.join(POLICIES)}")] = "fairbatching",
    model: EngineModelOpt = "llama-3-8b",
    device: DeviceOpt = None,
    num_blocks: BlocksOpt = None,
    block_size: BlockSizeOpt = 16,
    max_context: MaxContextOpt = 16384,
    trace: TraceOpt = None,
    fmt: FormatOpt = "auto",
    num: NumOpt = None,
    start: StartOpt = 0,
    qps: QpsOpt = None,
    seed: SeedOpt = 0,
    ttft: TtftOpt = DEFAULT_SLO.ttft,
    tpot: TpotOpt = DEFAULT_SLO.tpot,
    profile: Annotated[str | None, typer.Option("--profile", help="Cost-model profile the policy plans with")] = None,
    policy_option: PolicyOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
    wide: WideOpt = False,
) -> None:
    """Replay a workload on the GPU engine in real time, scheduled by a policy; same metrics as `simulate`."""
    from fairbatching.engine.loop import replay as replay_engine
    from fairbatching.metrics.summary import summarize
    from fairbatching.policies import make_policy

    if out:
        check_output_dir(out)
    workload = WorkloadSpec(str(trace) if trace else None, fmt, num, start, qps, seed).build()
    prof = load_profile(profile)
    slo = SLO(ttft, tpot)
    check_slo_feasible(slo, prof)
    cost = prof.cost_model()
    options = _parse_policy_options(policy_option or []).get(policy, {})
    pol = make_policy(policy, cost, tpot_slo=tpot, **options)
    runner = _engine(model, device, num_blocks, block_size, max_context)
    console.print(f"replaying {len(workload)} requests ({workload.qps:.2f} req/s) on {runner.device} with {policy}")
    with _progress() as bar:
        task = bar.add_task(policy, total=len(workload))
        res = replay_engine(runner, pol, cost, workload, slo, progress=lambda d, _t: bar.update(task, completed=d))
    s = summarize(policy, workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        s.write_json(out / "summary.json")
        s.write_requests_csv(out / "requests.csv")
    show(out_console, summary_table([s], wide=wide))


@app.command()
def traces(
    as_json: Annotated[bool, typer.Option("--json", help="Print the shapes as JSON on stdout")] = False,
) -> None:
    """List the bundled traces (usable as `--trace NAME` and `-w NAME`) with their shape."""
    from fairbatching.metrics.table import shapes_table
    from fairbatching.workloads.bundled import NOTICE, bundled_shapes

    shapes = bundled_shapes()
    if as_json:
        print(json.dumps(shapes, indent=2))
    else:
        show(out_console, shapes_table(shapes))
        console.print(f"sources, licenses and what was changed: {NOTICE}", markup=False)


@app.command()
def profiles() -> None:
    """List the bundled cost-model profiles."""
    from fairbatching.costmodel.profile import DEFAULT_PROFILE

    for name in available_profiles():
        p = load_profile(name)
        default = " (default)" if name == DEFAULT_PROFILE else ""
        line = f"{name}{default}  [{p.source}]  KV {p.kv.capacity_tokens:,} tokens  {p.note[:80]}"
        out_console.print(line, markup=False)


app.command()(serve_commands.serve)
app.command()(serve_commands.bench)


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
