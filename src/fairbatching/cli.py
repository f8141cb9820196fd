"""Command line: ``fairbatching simulate | compare | fit-profile | profiles``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import available_profiles, load_profile
from fairbatching.errors import FairBatchingError
from fairbatching.experiment import DEFAULT_QPS, DEFAULT_SLO, Experiment, WorkloadSpec
from fairbatching.metrics.table import markdown_table, summary_table, write_summary_csv
from fairbatching.policies import POLICIES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="FairBatching: SLO-fair LLM batch scheduling.")
console = Console(stderr=True, soft_wrap=True)
out_console = Console(width=None if sys.stdout.isatty() else 200)

TraceOpt = Annotated[
    Path | None, typer.Option("--trace", help="Trace file (Azure CSV, BurstGPT CSV, Mooncake JSONL); default: embedded")
]
FormatOpt = Annotated[str, typer.Option("--format", help="Trace format: auto, azure, burstgpt, mooncake")]
NumOpt = Annotated[
    int | None, typer.Option("--num-requests", "-n", help="Use this many requests (default: all / 2000)")
]
StartOpt = Annotated[int, typer.Option("--start", help="Skip this many requests of the trace first")]
QpsOpt = Annotated[
    float | None, typer.Option("--qps", help=f"Rescale arrivals to this mean rate (default workload: {DEFAULT_QPS})")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the synthetic default workload")]
TtftOpt = Annotated[float, typer.Option("--ttft-slo", help="TTFT SLO in seconds")]
TpotOpt = Annotated[float, typer.Option("--tpot-slo", help="TPOT SLO in seconds")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile name or JSON path (see `profiles`)")]
TimeoutOpt = Annotated[float | None, typer.Option("--queue-timeout", help="Drop requests waiting longer (s)")]
MaxLenOpt = Annotated[int, typer.Option("--max-model-len", help="Reject requests longer than this (tokens)")]


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
) -> Experiment:
    spec = WorkloadSpec(str(trace) if trace else None, fmt, num, start, qps, seed)
    return Experiment(spec.build(), load_profile(profile), SLO(ttft, tpot), max_len, timeout)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


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
    out: Annotated[Path | None, typer.Option("--out", help="Write summary.json and requests.csv here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
) -> None:
    """Simulate one policy on one workload."""
    exp = _experiment(trace, fmt, num, start, qps, seed, ttft, tpot, profile, timeout, max_len)
    _banner(exp)
    (result,) = _run_with_progress(exp, [policy])
    s = result.summary
    if out:
        out.mkdir(parents=True, exist_ok=True)
        s.write_json(out / "summary.json")
        s.write_requests_csv(out / "requests.csv")
    if as_json:
        print(json.dumps({**_describe(exp), "summary": s.to_dict()}, indent=2))
    else:
        out_console.print(summary_table([s]))


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
    out: Annotated[Path, typer.Option("--out", help="Report folder")] = Path("out/compare"),
) -> None:
    """Run several policies on the same workload; write tables, CSV/JSON and a plot + HTML report."""
    from fairbatching.report import plot_comparison, write_html_report

    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        raise FairBatchingError(f"unknown policy {', '.join(unknown) or '(none)'}; choose from {', '.join(POLICIES)}")
    exp = _experiment(trace, fmt, num, start, qps, seed, ttft, tpot, profile, timeout, max_len)
    _banner(exp)
    results = _run_with_progress(exp, names)
    summaries = [r.summary for r in results]
    out.mkdir(parents=True, exist_ok=True)
    title = f"{exp.workload.name} @ {exp.workload.qps:.2f} req/s, SLO {exp.slo.ttft:g} s / {exp.slo.tpot * 1e3:g} ms"
    settings = _describe(exp)
    (out / "summary.json").write_text(
        json.dumps({**settings, "results": [s.to_dict() for s in summaries]}, indent=2) + "\n"
    )
    write_summary_csv(summaries, out / "summary.csv")
    (out / "summary.md").write_text(f"{title}\n\n{markdown_table(summaries)}\n")
    for s in summaries:
        s.write_requests_csv(out / f"requests_{s.policy}.csv")
    png = plot_comparison(summaries, [r.sim.log for r in results], out / "compare.png", title)
    report = write_html_report(out / "report.html", title, summaries, [png], settings)
    out_console.print(summary_table(summaries, title=title))
    console.print(f"wrote {out}/summary.json, summary.csv, summary.md, requests_*.csv, {png.name}, {report.name}")


@app.command("fit-profile")
def fit_profile(
    rows: Annotated[
        Path, typer.Argument(help="Profile rows (CSV/JSON): new_tokens,context_tokens,num_seqs,attn_work,latency_s")
    ],
    out: Annotated[Path, typer.Option("--out", help="Profile JSON to write")],
    name: Annotated[str, typer.Option("--name", help="Profile name")] = "measured",
    base: Annotated[str | None, typer.Option("--base", help="Profile whose model, hardware and KV to keep")] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of rows held out")] = 0.2,
) -> None:
    """Fit the batch cost model to measured rows and save it as a profile."""
    from dataclasses import replace

    from fairbatching.costmodel.fit import fit_cost_model, load_profile_rows

    report = fit_cost_model(load_profile_rows(rows), holdout_fraction=holdout)
    prof = replace(
        load_profile(base),
        name=name,
        source="measured",
        params=report.model.params,
        fit=report.as_dict(),
        note=f"fitted from {rows.name}",
    )
    prof.save(out)
    out_console.print(
        f"fitted {report.train_rows} rows; held-out MAPE {report.holdout_mape * 100:.2f}%, "
        f"max error {report.holdout_max_error * 100:.2f}% on {report.holdout_rows} rows -> {out}"
    )


@app.command()
def profiles() -> None:
    """List the bundled cost-model profiles."""
    for name in available_profiles():
        p = load_profile(name)
        out_console.print(f"{name}  [{p.source}]  KV {p.kv.capacity_tokens:,} tokens  {p.note[:80]}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except FairBatchingError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value
        console.print(f"[red]error:[/] {exc.format_message()}")
        sys.exit(exc.exit_code)
