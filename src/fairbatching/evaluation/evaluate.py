"""The single-node evaluation: capacity, P99 TTFT at equal load, load curves and slack, per workload.

For every (workload family, SLO): each policy's capacity at the attainment target, the clairvoyant
bound, P99 TTFT of every policy at the best baseline's capacity (equal load, TPOT attainment alongside),
and latency-vs-load curves around that capacity. One slack-timeline run per policy shows where decode
slack went. Everything goes through the sweeper, so a rerun reuses finished simulations.

On the GPU backend (``engine`` given) every run is a real-time replay on the sweeper's engines, each capacity
search starts from the simulated capacity (``capacity.search_capacity``), and every GPU number has the
simulator's prediction of the same runs beside it (``sim_*`` fields; per curve point ``sim_attainment``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fairbatching.core.backend import Backend, EngineSpec
from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.evaluation.bounds import spec_bound
from fairbatching.evaluation.capacity import CapacityResult, search_capacity, search_windows
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.metrics.summary import Summary
from fairbatching.progress import Status
from fairbatching.report.curves import plot_load_curves, plot_slack_timeline
from fairbatching.report.html import write_html_page
from fairbatching.report.plots import plot_comparison
from fairbatching.runs import Engines, RunResult, RunSpec, check_slo_feasible, experiment
from fairbatching.validate import atomic_write_text, check_slo_seconds, comma_items, positive_list
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
        """For file names: a trace file's workload by its stem, not its path."""
        return f"{Path(self.workload).stem}_{self.ttft:g}_{self.tpot * 1e3:g}ms"


def parse_scenarios(text: str) -> list[Scenario]:
    """``workload:TTFT:TPOT:start_qps`` items, comma-separated."""
    scenarios = []
    for item in comma_items("--scenarios", text):
        try:
            w, t, p, q = item.split(":")
            sc = Scenario(w, float(t), float(p), float(q))
        except ValueError:
            raise ConfigError(
                f"--scenarios takes workload:TTFT:TPOT:start_qps items, e.g. default:2:0.1:8; got {item!r}"
            ) from None
        check_slo_seconds("--scenarios", item, sc.ttft, sc.tpot)
        scenarios.append(sc)
    return scenarios


def check_scenarios(scenarios: Sequence[Scenario], profile: str | None) -> None:
    """Every SLO feasible on the profile, every start load positive, every workload known: before any run."""
    prof = load_profile(profile)
    for sc in scenarios:
        check_slo_feasible(SLO(sc.ttft, sc.tpot), prof)
        positive_list("--scenarios start_qps", str(sc.start_qps))
        family(sc.workload)


def scenario_spec(
    sc: Scenario, policy: str, num_requests: int, profile: str | None, engine: EngineSpec | None = None
) -> RunSpec:
    """A run of ``sc`` (at 1 req/s until a search sets the load): on the simulator, or with ``engine`` on the GPU
    engines that build it."""
    backend = Backend.SIM if engine is None else Backend.GPU
    return RunSpec(policy, sc.workload, 1.0, 0, num_requests, sc.ttft, sc.tpot, profile, backend=backend, engine=engine)


def write_report(
    rows: list[dict[str, Any]],
    scenarios: Sequence[Scenario],
    policies: Sequence[str],
    out: Path,
    num_requests: int,
    target: float,
    profile: str | None,
    status: Status,
    engine: EngineSpec | None = None,
    engines: Engines = None,
) -> tuple[str, Path, int]:
    """The equal-load plots of the first scenario (replayed on ``engines`` for the GPU backend), evaluation.md
    and the HTML page: (table, page, plots)."""
    first = scenarios[0]
    ref = next((r["equal_load_qps"] for r in rows if r["workload"] == first.workload), None)
    images = sorted(out.glob("curves_*.png"))
    if ref:
        base = scenario_spec(first, policies[0], num_requests, profile, engine)
        spec = replace(base, qps=_load(ref, 1.0), seed=search_windows(base, 1).start)
        images.extend(equal_load_plots(first, spec, policies, out, status, engines))
    table = markdown(rows)
    prof = load_profile(profile)
    note = f"Profile: {prof.name} ({prof.source}). Target {target:.0%} of requests meeting TTFT and TPOT."
    if engine is not None:
        note += (
            f" Real-time replays on GPU engines ({engine.model} on {engine.hardware}); in brackets the simulator's "
            "prediction of the same runs."
        )
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
    engine: EngineSpec | None = None,
) -> list[dict[str, Any]]:
    """``under_test``: the policy the others are baselines for (None: all are); each capacity is set against
    the best baseline's, and equal load is that capacity. ``status`` hears what runs now (scenario, policy,
    load) and how many of that step's runs are done. ``engine``: the GPU backend's (the sweeper holds the
    engines)."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, sc in enumerate(scenarios, start=1):
        if not family(sc.workload).available():
            log(f"skip {sc.label}: trace file missing")
            continue
        head = f"[{i}/{len(scenarios)}] {sc.workload} {sc.ttft:g}s/{sc.tpot * 1e3:g}ms"
        base = scenario_spec(sc, policies[0], num_requests, profile, engine)
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
        sim = caps[p].sim_capacity_qps
        beside = f" (simulated {sim:.3f})" if sim is not None else ""
        log(f"{sc.label}: {p} capacity {caps[p].capacity_qps:.3f} req/s{beside}")
    best_baseline = max((caps[p].capacity_qps for p in policies if p != under_test), default=0.0)
    # Equal-load comparisons sit at the best baseline's capacity; if no baseline reaches the target at
    # any load tried, at the best capacity of any policy.
    ref = best_baseline or max(c.capacity_qps for c in caps.values())
    if ref <= 0:
        log(f"{sc.label}: no policy reaches {target:.0%} at any load tried; no load curves")
        return []
    equal, over = _load_curves(sc, base, policies, sweeper, out, seeds, ref, head, say)
    return [_row(sc, caps[p], bound, best_baseline, ref, equal[p], over[p]) for p in policies]


def _row(
    sc: Scenario,
    cap: CapacityResult,
    bound: float | None,
    best_baseline: float,
    ref: float,
    equal: dict[str, float],
    over: dict[str, float],
) -> dict[str, Any]:
    """One policy's line of evaluation.json; on a real backend the simulator's numbers beside the measured ones."""
    row = {
        "workload": sc.workload,
        "ttft_slo": sc.ttft,
        "tpot_slo": sc.tpot,
        "policy": cap.policy,
        "capacity_qps": cap.capacity_qps,
        "capacity_vs_best_baseline": cap.capacity_qps / best_baseline - 1 if best_baseline else float("nan"),
        "fraction_of_clairvoyant": cap.capacity_qps / bound if bound else float("nan"),
        "clairvoyant_qps": bound or float("nan"),
        "equal_load_qps": ref,
        "p99_ttft_at_equal_load": equal["p99_ttft"],
        "tpot_attainment_at_equal_load": equal["tpot_attainment"],
        "slo_attainment_at_equal_load": equal["slo_attainment"],
        "p99_ttft_at_125pct_load": over["p99_ttft"],
        "tpot_attainment_at_125pct_load": over["tpot_attainment"],
        "capacity_curve": [asdict(pt) for pt in cap.curve],
    }
    if cap.sim_capacity_qps is not None:
        row["backend"] = cap.backend
        row["sim_capacity_qps"] = cap.sim_capacity_qps
        for key in ("p99_ttft", "slo_attainment"):
            row[f"sim_{key}_at_equal_load"] = equal[f"sim_{key}"]
        row["sim_p99_ttft_at_125pct_load"] = over["sim_p99_ttft"]
    return row


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
    windows = search_windows(base, seeds)
    specs = [replace(base, policy=p, qps=q, seed=s) for q in loads for p in policies for s in windows]
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
    return search_capacity(spec, sweeper, target, seeds, sc.start_qps, tolerance, what, say)


def _quiet(what: str, done: float, total: int | None) -> None:
    pass


def _load(ref: float, factor: float) -> float:
    """A load level relative to the reference capacity, rounded so sweep points and lookups agree."""
    return round(ref * factor, 4)


def _mean_at(results: list[RunResult], policy: str, qps: float) -> dict[str, float]:
    """Means over the windows at one load; where every run has the simulator's summary beside it, its means too
    (``sim_`` keys)."""
    at = [r for r in results if r.spec and r.spec.policy == policy and r.spec.qps == qps]
    means = _means([r.summary for r in at])
    sims = [r.sim for r in at if r.sim is not None]
    if len(sims) == len(at):
        means.update({f"sim_{k}": v for k, v in _means(sims).items()})
    return means


def _means(sel: list[Summary]) -> dict[str, float]:
    return {
        "p99_ttft": sum(s.ttft.p99 for s in sel) / len(sel),
        "tpot_attainment": sum(s.tpot_attainment for s in sel) / len(sel),
        "slo_attainment": sum(s.slo_attainment for s in sel) / len(sel),
    }


def equal_load_plots(
    sc: Scenario,
    spec: RunSpec,
    policies: Sequence[str],
    out: Path,
    status: Status | None = None,
    engines: Engines = None,
) -> list[Path]:
    """One run per policy of ``spec`` (its load and window; on ``engines`` for the GPU backend, as many at once as
    there are engines): TTFT/TPOT CDFs with latency over time, and the decode-slack timeline."""
    say = status or _quiet
    what = f"{sc.workload} plots {{}} @ {spec.qps:.2f} req/s"
    results = experiment(spec, engines).run_all(list(policies), lambda p, d, t: say(what.format(p), d, t))
    runs = dict(zip(policies, results, strict=True))
    title = f"{sc.label} at {spec.qps:.2f} req/s"
    cdfs = plot_comparison(
        [r.summary for r in runs.values()], [r.log for r in runs.values()], out / f"cdfs_{sc.slug}.png", title
    )
    slack = plot_slack_timeline(
        {p: r.requests for p, r in runs.items()}, out / f"slack_{sc.slug}.png", f"decode slack, {title}"
    )
    return [cdfs, slack]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The evaluation table; on a real backend each measured capacity, SLO attainment and P99 TTFT has the
    simulator's in brackets."""
    head = (
        "| workload | SLO (TTFT / TPOT) | policy | capacity (req/s) | vs best baseline | of clairvoyant "
        "| P99 TTFT at equal load (s) | TPOT ok | SLO ok | P99 TTFT at 1.25x load (s) |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['ttft_slo']:g} s / {r['tpot_slo'] * 1e3:g} ms | {r['policy']} "
            f"| {_beside(r, 'capacity_qps', '.2f')} | {_percent(r['capacity_vs_best_baseline'], '+.1%')} "
            f"| {_percent(r['fraction_of_clairvoyant'])} "
            f"| {_beside(r, 'p99_ttft_at_equal_load', '.2f')} | {r['tpot_attainment_at_equal_load']:.1%} "
            f"| {_beside(r, 'slo_attainment_at_equal_load', '.1%')} | {_beside(r, 'p99_ttft_at_125pct_load', '.2f')} |"
        )
    return "\n".join(lines)


def _beside(row: dict[str, Any], key: str, spec: str) -> str:
    """``row[key]``, and the simulator's value of it in brackets where the row has one."""
    sim = row.get(f"sim_{key}")
    return format(row[key], spec) + ("" if sim is None else f" ({format(sim, spec)})")


def _percent(value: float, spec: str = ".0%") -> str:
    """A percentage, or a dash where there is none (no bound; no baseline reached the target)."""
    return "–" if math.isnan(value) else format(value, spec)
