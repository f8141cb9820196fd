"""Capacity: the highest request rate at which a policy keeps SLO attainment at or above a target.

Search: start at a guess, double (or halve) until the target is bracketed, then bisect geometrically
until the bracket is within a relative tolerance. Each load point is the mean attainment over several
seeds (different trace windows or synthetic draws), all run through the sweeper's cache and workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fairbatching.errors import ConfigError
from fairbatching.evaluation.runspec import ClusterRunSpec, RunSpec
from fairbatching.evaluation.sweep import Sweeper


@dataclass
class LoadPoint:
    qps: float
    attainment: float
    per_seed: list[float]
    p99_ttft: float
    tpot_attainment: float


@dataclass
class CapacityResult:
    policy: str
    workload: str
    capacity_qps: float
    target: float
    tolerance: float
    bracket: tuple[float, float]
    curve: list[LoadPoint] = field(default_factory=list)


def find_capacity(
    base: RunSpec | ClusterRunSpec,
    sweeper: Sweeper,
    target: float = 0.9,
    seeds: int = 3,
    start_qps: float = 4.0,
    tolerance: float = 0.02,
    max_points: int = 24,
    metric: str = "slo_attainment",
    on_point: Callable[[LoadPoint], None] | None = None,
    progress: Callable[[float, int, int], None] | None = None,
) -> CapacityResult:
    """Highest QPS (within ``tolerance``, relative) with mean ``metric`` >= ``target`` over ``seeds``.

    ``progress(qps, done, total)`` follows the runs of the load point being tried."""
    if not 0 < target <= 1:
        raise ConfigError(f"attainment target must be in (0, 1], got {target}")
    if not (0 < tolerance < 1 and start_qps > 0 and seeds >= 1):
        raise ConfigError("need 0 < tolerance < 1, start_qps > 0 and seeds >= 1")
    curve: list[LoadPoint] = []

    def evaluate(qps: float) -> bool:
        specs = [replace(base, qps=qps, seed=s) for s in range(seeds)]
        runs = sweeper.run(specs, progress=(lambda d, t: progress(qps, d, t)) if progress else None)
        results = [r["summary"] for r in runs]
        vals = [r[metric] for r in results]
        point = LoadPoint(
            qps,
            sum(vals) / len(vals),
            vals,
            max(r["ttft"]["p99"] for r in results),
            sum(r["tpot_attainment"] for r in results) / len(results),
        )
        curve.append(point)
        if on_point:
            on_point(point)
        return point.attainment >= target

    lo, hi = bracket_search(evaluate, start_qps, tolerance, max_points)
    curve.sort(key=lambda p: p.qps)
    label = base.label if isinstance(base, ClusterRunSpec) else base.policy
    return CapacityResult(label, base.workload, lo, target, tolerance, (lo, hi), curve)


def bracket_search(
    meets: Callable[[float], bool], start: float, tolerance: float, max_points: int, step: float = 2.0
) -> tuple[float, float]:
    """The highest load at which ``meets`` holds: multiply (divide) ``start`` by ``step`` until the target is
    bracketed, then bisect geometrically to ``tolerance`` (relative) or ``max_points`` evaluations. Returns
    ``(lo, hi)``: the highest load that met it (0 if none) and the lowest that did not (inf if none)."""
    lo, hi = 0.0, math.inf
    q, points = start, 0
    while points < max_points:
        points += 1
        if meets(q):
            lo = q
            if hi < math.inf:
                break
            q *= step
        else:
            hi = q
            if lo > 0:
                break
            q /= step
            if q < 1e-3:
                break
    while lo > 0 and hi < math.inf and hi / lo - 1 > tolerance and points < max_points:
        points += 1
        mid = math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi
