"""The `sweep` command's grid: policies x workloads x SLOs x loads x seeds, and the files it writes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.metrics.summary import Summary
from fairbatching.metrics.table import Column, FittedTable
from fairbatching.report.curves import plot_load_curves
from fairbatching.runs import RunResult, RunSpec, check_slo_feasible
from fairbatching.validate import check_slo_seconds, comma_items, positive_list

CSV_HEADER = "workload,ttft_slo,tpot_slo,qps,seed,policy,ttft_p99,tpot_p99,tpot_attainment,slo_attainment"


def parse_slos(text: str) -> list[tuple[float, float]]:
    """``TTFT:TPOT`` pairs in seconds, comma-separated."""
    pairs = []
    for item in comma_items("--slos", text):
        try:
            pair = tuple(float(x) for x in item.split(":"))
        except ValueError:
            raise ConfigError(f"--slos takes TTFT:TPOT pairs of numbers, e.g. 2:0.1,1:0.05; got {item!r}") from None
        if len(pair) != 2:
            raise ConfigError(f"--slos takes TTFT:TPOT pairs, e.g. --slos 2:0.1,1:0.05; got {item!r}")
        check_slo_seconds("--slos", item, *pair)
        pairs.append((pair[0], pair[1]))
    return pairs


def sweep_specs(
    policies: Sequence[str], workloads: str, loads: str, slos: str, seeds: int, num: int, profile: str | None
) -> list[RunSpec]:
    """Every run of the grid, each SLO checked against the profile first."""
    qps_levels = positive_list("--qps", loads)
    slo_pairs = parse_slos(slos)
    prof = load_profile(profile)
    for ttft, tpot in slo_pairs:
        check_slo_feasible(SLO(ttft, tpot), prof)
    return [
        RunSpec(p, w, q, s, num, ttft, tpot, profile)
        for w in comma_items("--workloads", workloads)
        for ttft, tpot in slo_pairs
        for q in qps_levels
        for p in policies
        for s in range(seeds)
    ]


def write_sweep(folder: Path, results: Sequence[RunResult]) -> list[Path]:
    """sweep.json, sweep.csv and one load-curve plot per (workload, SLO) into ``folder``; returns the plots."""
    specs = [r.spec for r in results if r.spec is not None]
    rows = [
        (s.workload, s.ttft_slo, s.tpot_slo, s.qps, s.seed, s.policy)
        + (r.summary.ttft.p99, r.summary.tpot.p99, r.summary.tpot_attainment, r.summary.slo_attainment)
        for s, r in zip(specs, results, strict=True)
    ]
    (folder / "sweep.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    (folder / "sweep.csv").write_text(CSV_HEADER + "\n" + "\n".join(",".join(map(str, row)) for row in rows) + "\n")
    plots = []
    for w, ttft, tpot in sorted({(s.workload, s.ttft_slo, s.tpot_slo) for s in specs}):
        part = [
            r for s, r in zip(specs, results, strict=True) if (s.workload, s.ttft_slo, s.tpot_slo) == (w, ttft, tpot)
        ]
        name = f"curves_{Path(w).name}_{ttft:g}_{tpot:g}.png"
        plots.append(plot_load_curves(part, folder / name, f"{w}, SLO {ttft:g} s / {tpot * 1e3:g} ms"))
    return plots


def sweep_tables(results: Sequence[RunResult]) -> list[FittedTable]:
    """One table per (workload, SLO): each load and policy, averaged over the seeds (trace windows) run."""
    groups: dict[tuple[str, float, float, int], dict[tuple[float, str], list[Summary]]] = {}
    for r in results:
        s = r.spec
        assert s is not None
        group = groups.setdefault((s.workload, s.ttft_slo, s.tpot_slo, s.num_requests), {})
        group.setdefault((s.qps, s.policy), []).append(r.summary)
    tables = []
    for (w, ttft, tpot, num), points in groups.items():
        runs = list(points.values())
        seeds = max(map(len, runs))
        windows = f"{num} requests" + (f", mean of {seeds} seeds" if seeds > 1 else "")
        tables.append(
            FittedTable(
                [
                    Column("req/s", [f"{qps:g}" for qps, _ in points]),
                    Column("policy", [policy for _, policy in points], "name", "left", style="bold"),
                    Column("SLO ok", _means(runs, lambda m: m.slo_attainment * 100, "{:.1f}%")),
                    Column("TTFT p99 (s)", _means(runs, lambda m: m.ttft.p99, "{:.2f}")),
                    Column("TPOT ok", _means(runs, lambda m: m.tpot_attainment * 100, "{:.1f}%")),
                    Column("goodput (req/s)", _means(runs, lambda m: m.goodput_rps, "{:.2f}")),
                ],
                f"sweep: {w}, SLO {ttft:g} s / {tpot * 1e3:g} ms, {windows}",
            )
        )
    return tables


def _means(runs: list[list[Summary]], get: Callable[[Summary], float], fmt: str) -> list[str]:
    return [fmt.format(float(np.mean([get(m) for m in point]))) for point in runs]
