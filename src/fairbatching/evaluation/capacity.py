"""Capacity: the highest request rate at which a policy keeps SLO attainment at or above a target.

Search: start at a guess, double (or halve) until the target is bracketed, then bisect geometrically
until the bracket is within a relative tolerance. Each load point is the mean attainment over several
seeds (different trace windows or synthetic draws), all run through the sweeper's cache and workers.

On the GPU backend a policy's search starts at its simulated capacity (same windows, same profile) and
steps by ``GPU_STEP`` instead of doubling, on windows from seed 1 on (seed 0 is the window `fairbatching
profile` calibrates on); every GPU point carries the simulator's attainment beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from fairbatching.core.backend import Backend
from fairbatching.errors import ConfigError
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.progress import Status
from fairbatching.runs import RunSpec

GPU_STEP = 1.15  # from the simulated capacity, a GPU search brackets in steps of this factor
GPU_FIRST_SEED = 1  # seed 0's window is the calibration window (`fairbatching profile`)


@dataclass
class LoadPoint:
    qps: float
    attainment: float
    per_seed: list[float]
    p99_ttft: float
    tpot_attainment: float
    sim_attainment: float | None = None  # the simulator's, for a point measured on a real backend


@dataclass
class CapacityResult:
    policy: str
    workload: str
    capacity_qps: float
    target: float
    tolerance: float
    bracket: tuple[float, float]
    curve: list[LoadPoint] = field(default_factory=list)
    backend: str = "sim"
    sim_capacity_qps: float | None = None  # on a real backend: the simulator's capacity, where the search began


def find_capacity(
    base: RunSpec,
    sweeper: Sweeper,
    target: float = 0.9,
    seeds: int = 3,
    start_qps: float = 4.0,
    tolerance: float = 0.02,
    max_points: int = 24,
    metric: str = "slo_attainment",
    on_point: Callable[[LoadPoint], None] | None = None,
    progress: Callable[[float, float, int], None] | None = None,
    step: float = 2.0,
    first_seed: int = 0,
) -> CapacityResult:
    """Highest QPS (within ``tolerance``, relative) with mean ``metric`` >= ``target`` over ``seeds`` windows
    (seeds ``first_seed`` on), bracketing in steps of ``step``.

    ``progress(qps, done, total)`` follows the runs of the load point being tried."""
    if not 0 < target <= 1:
        raise ConfigError(f"attainment target must be in (0, 1], got {target}")
    if not (0 < tolerance < 1 and start_qps > 0 and seeds >= 1):
        raise ConfigError("need 0 < tolerance < 1, start_qps > 0 and seeds >= 1")
    curve: list[LoadPoint] = []

    def evaluate(qps: float) -> bool:
        specs = [replace(base, qps=qps, seed=s) for s in range(first_seed, first_seed + seeds)]
        runs = sweeper.run(specs, progress=(lambda d, t: progress(qps, d, t)) if progress else None)
        results = [r.summary for r in runs]
        vals = [getattr(r, metric) for r in results]
        sims = [getattr(r.sim, metric) for r in runs if r.sim is not None]
        point = LoadPoint(
            qps,
            sum(vals) / len(vals),
            vals,
            max(r.ttft.p99 for r in results),
            sum(r.tpot_attainment for r in results) / len(results),
            sum(sims) / len(sims) if len(sims) == len(runs) else None,
        )
        curve.append(point)
        if on_point:
            on_point(point)
        return point.attainment >= target

    lo, hi = bracket_search(evaluate, start_qps, tolerance, max_points, step)
    curve.sort(key=lambda p: p.qps)
    return CapacityResult(base.label, base.workload, lo, target, tolerance, (lo, hi), curve, str(base.backend))


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


def search_windows(spec: RunSpec, seeds: int) -> range:
    """The seeds (trace windows) every load of a search on ``spec``'s backend runs: from seed 1 on a real backend
    (see the module doc)."""
    first = 0 if spec.backend is Backend.SIM else GPU_FIRST_SEED
    return range(first, first + seeds)


def search_capacity(
    spec: RunSpec,
    sweeper: Sweeper,
    target: float,
    seeds: int,
    start_qps: float,
    tolerance: float,
    what: str,
    status: Status,
    log: Callable[[str], None] | None = None,
) -> CapacityResult:
    """``spec``'s capacity on its backend: on the simulator from ``start_qps``, on a real backend from the
    simulator's capacity on the same windows (see the module doc). ``status`` hears ``what`` (a format string for
    the load) with the runs done at each load; ``log``, when given, the search's start and every point."""
    say = log or _quiet
    windows = search_windows(spec, seeds)
    start, sim_capacity = start_qps, None
    if spec.backend is not Backend.SIM:
        status(f"{spec.label} {spec.workload}: simulating the capacity the GPU search starts from", 0, None)
        sim = find_capacity(spec.simulated(), sweeper, target, seeds, start_qps, tolerance, first_seed=windows.start)
        sim_capacity = sim.capacity_qps
        start = sim_capacity if sim_capacity > 0 else start_qps
        say(f"[bold]{spec.label}[/] on {spec.workload}: simulated capacity {sim_capacity:.3f} req/s: GPU from there")
    else:
        say(f"[bold]{spec.label}[/] on {spec.workload}: searching (target {target:.0%}, tolerance {tolerance:.0%})")
    result = find_capacity(
        spec,
        sweeper,
        target,
        seeds,
        start,
        tolerance,
        on_point=lambda p: say(point_line(p)),
        progress=lambda q, d, t: status(what.format(q), d, t),
        step=2.0 if sim_capacity is None else GPU_STEP,
        first_seed=windows.start,
    )
    result.sim_capacity_qps = sim_capacity
    return result


def policy_capacities(
    base: RunSpec,
    policies: Sequence[str],
    sweeper: Sweeper,
    target: float,
    seeds: int,
    start_qps: float,
    tolerance: float,
    log: Callable[[str], None],
    status: Status,
) -> list[CapacityResult]:
    """Each policy's capacity on ``base``'s workload, SLO and backend, logging every load point tried."""
    return [
        search_capacity(
            replace(base, policy=name),
            sweeper,
            target,
            seeds,
            start_qps,
            tolerance,
            f"{name} {base.workload} @ {{:.2f}} req/s",
            status,
            log,
        )
        for name in policies
    ]


def _quiet(line: str) -> None:
    pass


def capacity_lines(
    results: Sequence[CapacityResult], bound: float | None, num_requests: int, under_test: str | None = None
) -> list[str]:
    """The capacity table: each policy against the clairvoyant bound, and ``under_test`` against the best of
    the others (the baselines)."""
    best_base = max((r.capacity_qps for r in results if r.policy != under_test), default=0.0)
    lines = []
    for r in results:
        gain = (
            f" ({r.capacity_qps / best_base - 1:+.1%} vs best baseline)" if r.policy == under_test and best_base else ""
        )
        of_bound = ""
        if bound:  # the bound holds for sustained load; a window that finishes as one burst can beat it
            of_bound = (
                f"  {r.capacity_qps / bound:5.1%} of the clairvoyant bound"
                if r.capacity_qps <= bound
                else "  above the bound"
            )
        censored = "  (a lower bound: no load tried missed the target)" if math.isinf(r.bracket[1]) else ""
        sim = f"  simulated {r.sim_capacity_qps:.3f}" if r.sim_capacity_qps is not None else ""
        lines.append(
            f"{r.policy:14s} capacity {r.capacity_qps:7.3f} req/s  bracket [{r.bracket[0]:.3f}, {r.bracket[1]:.3f}]"
            f"{sim}{of_bound}{gain}{censored}"
        )
    if not bound:
        return [
            *lines,
            f"no clairvoyant bound: in {num_requests} requests one output's sequential decode steps, not GPU "
            "throughput, set the minimum time (use more requests)",
        ]
    lines.append(f"{'clairvoyant':14s} bound    {bound:7.3f} req/s (GPU 100% busy, latency ignored)")
    if any(r.capacity_qps > bound for r in results):
        lines.append(
            f"a capacity above the bound means {num_requests} requests are too few to load the GPU for long: raise -n"
        )
    return lines


def point_line(p: LoadPoint) -> str:
    seeds = ", ".join(f"{v:.1%}" for v in p.per_seed)
    sim = f"  simulated {p.sim_attainment:.1%}" if p.sim_attainment is not None else ""
    return (
        f"  {p.qps:8.3f} req/s  attainment {p.attainment:6.1%}  (seeds {seeds})"
        f"  P99 TTFT {p.p99_ttft:.2f} s  TPOT ok {p.tpot_attainment:.1%}{sim}"
    )
