"""The single-node evaluation: capacity, P99 TTFT at equal load, load curves and slack, per workload.

For every (workload family, SLO): each policy's capacity at the attainment target, the clairvoyant
bound, P99 TTFT of every policy at the best baseline's capacity (equal load, TPOT attainment alongside),
and latency-vs-load curves around that capacity. One slack-timeline run per policy shows where decode
slack went. Everything goes through the sweeper, so a rerun reuses finished simulations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.evaluation.bounds import spec_bound
from fairbatching.evaluation.capacity import CapacityResult, find_capacity
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.progress import Status
from fairbatching.report.curves import plot_load_curves, plot_slack_timeline
from fairbatching.report.html import write_html_page
from fairbatching.report.plots import plot_comparison
from fairbatching.runs import Experiment, RunResult, RunSpec, check_slo_feasible
from fairbatching.validate import atomic_write_text, positive_list
from fairbatching.workloads.families import family

LOAD_FACTORS = (0.7, 0.85, 1.0, 1.1, 1.25, 1.5)


@dataclass(frozen=True)
class Scenario:
    workload: str
    ttft: float
    tpot: float
    start_qps: float

    @property
    def label(self) -> str:
        return f"{self.workload}, SLO {self.ttft:g} s / {self.tpot * 1e3:g} ms"

    @property
    def slug(self) -> str:
        return f"{self.workload}_{self.ttft:g}_{self.tpot * 1e3:g}ms"


def parse_scenarios(text: str) -> list[Scenario]:
    """``workload:TTFT:TPOT:start_qps`` items, comma-separated."""
    try:
        return [
            Scenario(w, float(t), float(p), float(q))
            for w, t, p, q in (item.strip().split(":") for item in text.split(",") if item.strip())
        ]
    except ValueError:
        raise ConfigError("--scenarios takes workload:TTFT:TPOT:start_qps items, e.g. default:2:0.1:8") from None


def check_scenarios(scenarios: Sequence[Scenario], profile: str | None) -> None:
    """Every SLO feasible on the profile, every start load positive, every workload known: before any run."""
    prof = load_profile(profile)
    for sc in scenarios:
        check_slo_feasible(SLO(sc.ttft, sc.tpot), prof)
        positive_list("--scenarios start_qps", str(sc.start_qps))
        family(sc.workload)


def write_report(
    rows: list[dict[str, Any]],
    scenarios: Sequence[Scenario],
    policies: Sequence[str],
    out: Path,
    num_requests: int,
    target: float,
    profile: str | None,
    status: Status,
) -> tuple[str, Path, int]:
    """The equal-load plots of the first scenario, evaluation.md and the HTML page: (table, page, plots)."""
    first = scenarios[0]
    ref = next((r["equal_load_qps"] for r in rows if r["workload"] == first.workload), None)
    images = sorted(out.glob("curves_*.png"))
    if ref:
        images.extend(equal_load_plots(first, ref, policies, out, num_requests, profile, status))
    table = markdown(rows)
    prof = load_profile(profile)
    note = f"Profile: {prof.name} ({prof.source}). Target {target:.0%} of requests meeting TTFT and TPOT."
    atomic_write_text(out / "evaluation.md", f"{note}\n\n{table}\n")
    page = write_html_page(
        out / "report.html", "FairBatching single-node evaluation", f"<p>{note}</p><pre>{table}</pre>", images
    )
    return table, page, len(images)


def evaluate(
    scenarios: Sequence[Scenario],
    policies: Sequence[str],
    sweeper: Sweeper,
    out: Path,
    num_requests: int = 2000,
    seeds: int = 3,
    target: float = 0.9,
    tolerance: float = 0.02,
    profile: str | None = None,
    log: Callable[[str], None] = print,
    status: Status | None = None,
    under_test: str | None = None,
) -> list[dict[str, Any]]:
    """``under_test``: the policy the others are baselines for (None: all are); each capacity is set against
    the best baseline's, and equal load is that capacity. ``status`` hears what runs now (scenario, policy,
    load) and how many of that step's runs are done."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, sc in enumerate(scenarios, start=1):
        if not family(sc.workload).available():
            log(f"skip {sc.label}: trace file missing")
            continue
        head = f"[{i}/{len(scenarios)}] {sc.workload} {sc.ttft:g}s/{sc.tpot * 1e3:g}ms"
        base = RunSpec(policies[0], sc.workload, 1.0, 0, num_requests, sc.ttft, sc.tpot, profile)
        say = status or _quiet
        rows += _scenario_rows(sc, base, policies, under_test, sweeper, out, seeds, target, tolerance, log, head, say)
        atomic_write_text(out / "evaluation.json", json.dumps(rows, indent=2) + "\n")
    return rows


def _scenario_rows(
    sc: Scenario,
    base: RunSpec,
    policies: Sequence[str],
    under_test: str | None,
    sweeper: Sweeper,
    out: Path,
    seeds: int,
    target: float,
    tolerance: float,
    log: Callable[[str], None],
    head: str,
    say: Status,
) -> list[dict[str, Any]]:
    bound = spec_bound(base, seeds)
    caps = {p: _capacity(sc, replace(base, policy=p), sweeper, seeds, target, tolerance, head, say) for p in policies}
    for p in policies:
        log(f"{sc.label}: {p} capacity {caps[p].capacity_qps:.3f} req/s")
    best_baseline = max((caps[p].capacity_qps for p in policies if p != under_test), default=0.0)
    # Equal-load comparisons sit at the best baseline's capacity; if no baseline reaches the target at
    # any load tried, at the best capacity of any policy.
    ref = best_baseline or max(c.capacity_qps for c in caps.values())
    if ref <= 0:
        log(f"{sc.label}: no policy reaches {target:.0%} at any load tried; no load curves")
        return []
    equal, over = _load_curves(sc, base, policies, sweeper, out, seeds, ref, head, say)
    return [
        {
            "workload": sc.workload,
            "ttft_slo": sc.ttft,
            "tpot_slo": sc.tpot,
            "policy": p,
            "capacity_qps": caps[p].capacity_qps,
            "capacity_vs_best_baseline": caps[p].capacity_qps / best_baseline - 1 if best_baseline else float("nan"),
            "fraction_of_clairvoyant": caps[p].capacity_qps / bound if bound else float("nan"),
            "clairvoyant_qps": bound or float("nan"),
            "equal_load_qps": ref,
            "p99_ttft_at_equal_load": equal[p]["p99_ttft"],
            "tpot_attainment_at_equal_load": equal[p]["tpot_attainment"],
            "slo_attainment_at_equal_load": equal[p]["slo_attainment"],
            "p99_ttft_at_125pct_load": over[p]["p99_ttft"],
            "tpot_attainment_at_125pct_load": over[p]["tpot_attainment"],
            "capacity_curve": [asdict(pt) for pt in caps[p].curve],
        }
        for p in policies
    ]


def _load_curves(
    sc: Scenario,
    base: RunSpec,
    policies: Sequence[str],
    sweeper: Sweeper,
    out: Path,
    seeds: int,
    ref: float,
    head: str,
    say: Status,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Every policy at the loads around ``ref``, plotted; their means at ``ref`` and at 125% of it."""
    loads = sorted({_load(ref, f) for f in LOAD_FACTORS})
    specs = [replace(base, policy=p, qps=q, seed=s) for q in loads for p in policies for s in range(seeds)]
    what = f"{head} curves, {len(policies)} policies x {len(loads)} loads"
    curve_results = sweeper.run(specs, progress=lambda d, t: say(what, d, t))
    plot_load_curves(curve_results, out / f"curves_{sc.slug}.png", sc.label)
    equal = {p: _mean_at(curve_results, p, _load(ref, 1.0)) for p in policies}
    over = {p: _mean_at(curve_results, p, _load(ref, 1.25)) for p in policies}
    return equal, over


def _capacity(
    sc: Scenario, spec: RunSpec, sweeper: Sweeper, seeds: int, target: float, tolerance: float, head: str, say: Status
) -> CapacityResult:
    what = f"{head} capacity {spec.policy} @ {{:.2f}} req/s"
    progress = lambda q, d, t: say(what.format(q), d, t)  # noqa: E731
    return find_capacity(spec, sweeper, target, seeds, sc.start_qps, tolerance, progress=progress)


def _quiet(what: str, done: int, total: int | None) -> None:
    pass


def _load(ref: float, factor: float) -> float:
    """A load level relative to the reference capacity, rounded so sweep points and lookups agree."""
    return round(ref * factor, 4)


def _mean_at(results: list[RunResult], policy: str, qps: float) -> dict[str, float]:
    sel = [r.summary for r in results if r.spec and r.spec.policy == policy and r.spec.qps == qps]
    return {
        "p99_ttft": sum(s.ttft.p99 for s in sel) / len(sel),
        "tpot_attainment": sum(s.tpot_attainment for s in sel) / len(sel),
        "slo_attainment": sum(s.slo_attainment for s in sel) / len(sel),
    }


def equal_load_plots(
    sc: Scenario,
    qps: float,
    policies: Sequence[str],
    out: Path,
    num_requests: int = 2000,
    profile: str | None = None,
    status: Status | None = None,
) -> list[Path]:
    """One run per policy at ``qps``: TTFT/TPOT CDFs with latency over time, and the decode-slack timeline."""
    w = family(sc.workload).build(qps, 0, num_requests)
    exp = Experiment(w, load_profile(profile), SLO(sc.ttft, sc.tpot))
    say = status or _quiet
    runs = {p: exp.run(p, lambda d, t, p=p: say(f"{sc.workload} plots {p} @ {qps:.2f} req/s", d, t)) for p in policies}
    title = f"{sc.label} at {qps:.2f} req/s"
    cdfs = plot_comparison(
        [r.summary for r in runs.values()], [r.log for r in runs.values()], out / f"cdfs_{sc.slug}.png", title
    )
    slack = plot_slack_timeline(
        {p: r.requests for p, r in runs.items()}, out / f"slack_{sc.slug}.png", f"decode slack, {title}"
    )
    return [cdfs, slack]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| workload | SLO (TTFT / TPOT) | policy | capacity (req/s) | vs best baseline | of clairvoyant "
        "| P99 TTFT at equal load (s) | TPOT ok | SLO ok | P99 TTFT at 1.25x load (s) |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['ttft_slo']:g} s / {r['tpot_slo'] * 1e3:g} ms | {r['policy']} "
            f"| {r['capacity_qps']:.2f} | {_percent(r['capacity_vs_best_baseline'], '+.1%')} "
            f"| {_percent(r['fraction_of_clairvoyant'])} "
            f"| {r['p99_ttft_at_equal_load']:.2f} | {r['tpot_attainment_at_equal_load']:.1%} "
            f"| {r['slo_attainment_at_equal_load']:.1%} | {r['p99_ttft_at_125pct_load']:.2f} |"
        )
    return "\n".join(lines)


def _percent(value: float, spec: str = ".0%") -> str:
    """A percentage, or a dash where there is none (no bound; no baseline reached the target)."""
    return "–" if math.isnan(value) else format(value, spec)
