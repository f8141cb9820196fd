"""The `cluster` command's comparison: node-policy + router stacks at one load, or each stack's capacity."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fairbatching.errors import ConfigError
from fairbatching.evaluation.capacity import find_capacity, point_line
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.runs import RunResult, RunSpec
from fairbatching.validate import policy_names

RUN_FIELDS = ("slo_attainment", "ttft_attainment", "tpot_attainment", "goodput_rps", "rejected", "preemptions")


def cluster_stacks(pairs: str, base: RunSpec) -> list[RunSpec]:
    """``policy:router[:admission]`` items, each a copy of ``base`` (a cluster spec); bad stacks fail here."""
    from fairbatching.cluster import make_router

    assert base.cluster is not None
    stacks = []
    for item in [p.strip() for p in pairs.split(",") if p.strip()]:
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
            }
        )
    return rows


def run_line(row: dict[str, Any]) -> str:
    return (
        f"{row['stack']:34s} SLO ok {row['slo_attainment']:6.1%}  P99 TTFT {row['ttft_p99']:7.2f} s  "
        f"TPOT ok {row['tpot_attainment']:6.1%}  goodput {row['goodput_rps']:7.2f} req/s  rejected {row['rejected']}"
    )


def stack_capacities(
    stacks: Sequence[RunSpec],
    sweeper: Sweeper,
    seeds: int,
    tolerance: float,
    log: Callable[[str], None],
    activity: Callable[[], Any],
) -> list[dict[str, Any]]:
    """Each stack's capacity at 90% SLO attainment, searched from the stacks' load."""
    rows = []
    for s in stacks:
        assert s.cluster is not None
        log(f"[bold]{s.label}[/] on {s.cluster.nodes} nodes, {s.workload}: searching")
        what = f"{s.label} x{s.cluster.nodes} {s.workload} @ {{:.2f}} req/s"
        with activity() as status:
            res = find_capacity(
                s,
                sweeper,
                0.9,
                seeds,
                s.qps,
                tolerance,
                on_point=lambda p: log(point_line(p)),
                progress=lambda q, d, t, what=what, status=status: status(what.format(q), d, t),
            )
        rows.append(
            {
                "stack": s.label,
                "policy": s.policy,
                "capacity_qps": res.capacity_qps,
                "bracket": res.bracket,
                "curve": [asdict(p) for p in res.curve],
            }
        )
    return rows


def capacity_lines(rows: Sequence[dict[str, Any]], under_test: str | None = None) -> list[str]:
    """Each stack's capacity, against the best stack whose node policy is not ``under_test`` (the baselines)."""
    base = max((r["capacity_qps"] for r in rows if r["policy"] != under_test), default=0.0)
    lines = []
    for r in rows:
        gain = f"  ({r['capacity_qps'] / base - 1:+.1%} vs best baseline stack)" if base else ""
        lines.append(f"{r['stack']:34s} capacity {r['capacity_qps']:8.2f} req/s{gain}")
    return lines


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
