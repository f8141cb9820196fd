"""The `cluster` command's comparison: node-policy + router stacks at one load, or each stack's capacity."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fairbatching.errors import ConfigError
from fairbatching.evaluation.capacity import search_capacity
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.metrics.table import Column, FittedTable
from fairbatching.runs import RunResult, RunSpec
from fairbatching.validate import comma_items, policy_names

RUN_FIELDS = ("slo_attainment", "ttft_attainment", "tpot_attainment", "goodput_rps", "rejected", "preemptions")


def cluster_stacks(pairs: str, base: RunSpec) -> list[RunSpec]:
    """``policy:router[:admission]`` items, each a copy of ``base`` (a cluster spec); bad stacks fail here."""
    from fairbatching.cluster import make_router

    assert base.cluster is not None
    stacks = []
    for item in comma_items("--pairs", pairs):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"--pairs takes policy:router[:admission], got {item!r}")
        policy_names(parts[0])
        shape = replace(base.cluster, router=parts[1])
        stacks.append(replace(base, policy=parts[0], cluster=shape, admission=parts[2] if len(parts) == 3 else "none"))
    for s in stacks:
        assert s.cluster is not None
        make_router(s.cluster.router, admission=s.admission != "none")  # fail fast on a bad stack, before any run
    return stacks


def stack_runs(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per stack run: its attainments, goodput and P99 latencies."""
    rows = []
    for r in results:
        m = r.summary
        rows.append(
            {
                "stack": m.policy,
                **{k: getattr(m, k) for k in RUN_FIELDS},
                "ttft_p99": m.ttft.p99,
                "tpot_p99": m.tpot.p99,
                **(
                    {}
                    if r.sim is None
                    else {"sim_slo_attainment": r.sim.slo_attainment, "sim_ttft_p99": r.sim.ttft.p99}
                ),
            }
        )
    return rows


def cluster_title(base: RunSpec, seeds: int | None = None) -> str:
    """What the table compares: nodes, workload, load (or, given ``seeds``, the capacity search), SLO and the
    requests per run."""
    assert base.cluster is not None
    slo = f"SLO {base.ttft_slo:g} s / {base.tpot_slo * 1e3:g} ms"
    where = f"{base.cluster.nodes} nodes, {base.workload}"
    if seeds is None:
        return f"{where} @ {base.qps:g} req/s, {slo}, {base.num_requests} requests"
    windows = f"{base.num_requests} requests x {seeds} seed{'s' if seeds > 1 else ''}"
    return f"{where}: capacity at 90% SLO met ({slo}, {windows})"


def run_table(rows: Sequence[dict[str, Any]], title: str) -> FittedTable:
    """The stacks side by side at one load (the simulator beside GPU replays); refused requests count as misses
    in SLO ok."""
    return FittedTable(
        [
            Column("stack", [r["stack"] for r in rows], "name", "left", style="bold"),
            Column("SLO ok", [f"{r['slo_attainment']:.1%}" for r in rows]),
            Column("TTFT p99 (s)", [f"{r['ttft_p99']:.2f}" for r in rows]),
            Column("TPOT ok", [f"{r['tpot_attainment']:.1%}" for r in rows]),
            Column("goodput (req/s)", [f"{r['goodput_rps']:.2f}" for r in rows]),
            Column("refused", [str(r["rejected"]) for r in rows]),
            *(
                [
                    Column("SLO ok, simulated", [f"{r['sim_slo_attainment']:.1%}" for r in rows]),
                    Column("TTFT p99, simulated (s)", [f"{r['sim_ttft_p99']:.2f}" for r in rows]),
                ]
                if rows and all("sim_slo_attainment" in r for r in rows)
                else []
            ),
        ],
        title,
    )


def stack_capacities(
    stacks: Sequence[RunSpec],
    sweeper: Sweeper,
    seeds: int,
    tolerance: float,
    log: Callable[[str], None],
    activity: Callable[[], Any],
) -> list[dict[str, Any]]:
    """Each stack's capacity at 90% SLO attainment, searched from the stacks' load; on GPU engines from the
    cluster simulator's capacity (``capacity.search_capacity``), which each row then carries."""
    rows = []
    for s in stacks:
        assert s.cluster is not None
        what = f"{s.label} x{s.cluster.nodes} {s.workload} @ {{:.2f}} req/s"
        with activity() as status:
            res = search_capacity(s, sweeper, 0.9, seeds, s.qps, tolerance, what, status, log)
        rows.append(
            {
                "stack": s.label,
                "policy": s.policy,
                "capacity_qps": res.capacity_qps,
                "bracket": res.bracket,
                **({} if res.sim_capacity_qps is None else {"sim_capacity_qps": res.sim_capacity_qps}),
                "curve": [asdict(p) for p in res.curve],
            }
        )
    return rows


def capacity_table(rows: Sequence[dict[str, Any]], title: str, under_test: str | None = None) -> FittedTable:
    """Each stack's capacity, against the best stack whose node policy is not ``under_test`` (the baselines), and
    the simulator's beside a measured one."""
    base = max((r["capacity_qps"] for r in rows if r["policy"] != under_test), default=0.0)
    simulated = bool(rows) and all("sim_capacity_qps" in r for r in rows)
    return FittedTable(
        [
            Column("stack", [r["stack"] for r in rows], "name", "left", style="bold"),
            Column("capacity (req/s)", [f"{r['capacity_qps']:.2f}" for r in rows]),
            Column("vs best baseline stack", [f"{r['capacity_qps'] / base - 1:+.1%}" if base else "-" for r in rows]),
            *([Column("simulated (req/s)", [f"{r['sim_capacity_qps']:.2f}" for r in rows])] if simulated else []),
        ],
        title,
    )


def write_cluster(folder: Path, rows: list[dict[str, Any]], base: RunSpec, capacity: bool) -> list[Path]:
    """cluster.json, and with ``capacity`` the stacks' capacity curves; returns the plots."""
    assert base.cluster is not None
    plots = []
    if capacity:
        from fairbatching.report.curves import plot_capacity_curves

        title = f"{base.cluster.nodes} nodes, {base.workload}"
        plots.append(plot_capacity_curves(rows, folder / "capacity_curves.png", title))
    data = {"nodes": base.cluster.nodes, "workload": base.workload, "rows": rows}
    (folder / "cluster.json").write_text(json.dumps(data, indent=2) + "\n")
    return plots
