"""Serving calibration on the engine: the profiling grid's cost model refitted on the steps real replays ran.

The calibration window is the first requests of the Azure conversation trace (seed 0 of its family: the
window capacity searches on the GPU leave out), replayed once per policy at 85% of the grid profile's
simulated capacity for FairBatching, so the steps span light and heavy batches without the queue running
away. Every served step, priced at its period (``costmodel.serving``), refits the model.

The validation then replays a held-out window (requests from ``VALIDATION_START`` on, which the calibration never
replays) once per policy, planning with the profile it validates, at that profile's simulated capacity for
FairBatching there: the load a user would read off the simulator. It records how far the simulator's SLO
attainment and P99 TTFT for the same requests are from the engine's, and the profile's step-period error on the
held-out steps, so a profile says how far its simulated capacities can be trusted on the GPU it was measured on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.costmodel.fit import FitReport
from fairbatching.costmodel.profile import Profile
from fairbatching.costmodel.serving import period_mape, serving_profile, serving_rows
from fairbatching.errors import ConfigError, ProfileError
from fairbatching.evaluation.capacity import bracket_search
from fairbatching.metrics.summary import Summary, summarize
from fairbatching.policies import make_policy
from fairbatching.runs import Experiment, WorkloadSpec
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload

WORKLOAD = "azure-conv"
POLICIES = ("fairbatching", "sarathi", "vllm")
LOAD_SHARE = 0.85  # of the grid profile's simulated capacity
STEP_COLUMNS = ("new_tokens", "context_tokens", "num_seqs", "attn_work", "period")
# The validation window: requests from here on (the README's held-out GPU windows start here too), at this
# share of the validated profile's simulated capacity for FairBatching on them.
VALIDATION_START = 9000
VALIDATION_LOAD = 1.0
# What the validation passes at: every policy's simulated SLO attainment within this many points of the
# engine's, and the step periods priced within this MAPE over all held-out steps.
ATTAINMENT_TOLERANCE_PTS = 5.0
STEP_MAPE_TOLERANCE = 0.10


@dataclass
class Calibration:
    profile: Profile
    report: FitReport
    steps: np.ndarray  # one row per served step: STEP_COLUMNS
    record: dict[str, Any] = field(default_factory=dict)  # what was done, as the profile's fit records it


@dataclass
class Validation:
    steps: np.ndarray  # one row per held-out served step: STEP_COLUMNS
    record: dict[str, Any]  # what the profile's fit records as "validation"


@dataclass(frozen=True)
class CalibrationWindow:
    """The requests replayed, the load they are replayed at, and the simulated capacity that load came from."""

    workload: Workload
    qps: float
    sim_capacity_qps: float
    start: int = 0  # the window's first request in the trace


def check_windows(calibration_requests: int, validation_requests: int) -> None:
    """Before anything is measured: the calibration must not replay the held-out window, and the trace must
    hold the whole validation window."""
    if calibration_requests > VALIDATION_START:
        raise ConfigError(
            f"--calibration-requests {calibration_requests}: at most {VALIDATION_START} (the held-out validation "
            f"window starts at request {VALIDATION_START})"
        )
    if validation_requests:
        trace_window(validation_requests, VALIDATION_START)


def calibration_window(grid: Profile, requests: int, max_context: int, slo: SLO) -> CalibrationWindow:
    """The first ``requests`` of the trace at ``LOAD_SHARE`` of ``grid``'s simulated capacity for FairBatching
    (>= 90% of requests meeting ``slo``)."""
    return simulated_window(grid, requests, 0, LOAD_SHARE, max_context, slo)


def validation_window(prof: Profile, requests: int, max_context: int, slo: SLO) -> CalibrationWindow:
    """``requests`` from ``VALIDATION_START`` on (requests no calibration replays) at ``VALIDATION_LOAD`` of
    ``prof``'s simulated capacity for FairBatching on them."""
    return simulated_window(prof, requests, VALIDATION_START, VALIDATION_LOAD, max_context, slo)


def simulated_window(
    prof: Profile, requests: int, start: int, share: float, max_context: int, slo: SLO
) -> CalibrationWindow:
    """``requests`` of the trace from ``start`` at ``share`` of ``prof``'s simulated capacity for FairBatching
    (>= 90% of requests meeting ``slo``)."""
    base = trace_window(requests, start)

    def meets(qps: float) -> bool:
        exp = Experiment(base.rescaled(qps), prof, slo, max_model_len=max_context)
        return exp.run("fairbatching").summary.slo_attainment >= 0.9

    capacity, _ = bracket_search(meets, 4.0, 0.03, 14)
    qps = round(share * capacity, 2) if capacity > 0 else 1.0
    return CalibrationWindow(base.rescaled(qps), qps, capacity, start)


def trace_window(requests: int, start: int) -> Workload:
    """``requests`` consecutive requests of the trace from ``start``, at the trace's own rate."""
    return WorkloadSpec(str(family(WORKLOAD).path()), num_requests=requests, start=start).build()


def _replay_each(
    runner: Any,
    prof: Profile,
    workload: Workload,
    slo: SLO,
    policies: Sequence[str],
    progress: Callable[[str, int, int], None] | None,
) -> list[tuple[str, Any]]:
    """Each policy's replay of ``workload`` on ``runner``, planning with ``prof`` for ``slo``: (policy, its
    ``NodeResult``), or (policy, why it could not plan), e.g. Sarathi's token budget when no batch fits the TPOT
    SLO on this profile."""
    from fairbatching.engine.loop import replay

    cost = prof.cost_model()
    out: list[tuple[str, Any]] = []
    for p in policies:
        try:
            policy = make_policy(p, cost, tpot_slo=slo.tpot)
        except ConfigError as exc:
            out.append((p, str(exc)))
            continue
        step = None if progress is None else lambda d, t, p=p: progress(p, d, t)
        out.append((p, replay(runner, policy, cost, workload, slo, progress=step)))
    return out


def _served(policy: str, workload: Workload, res: Any) -> tuple[np.ndarray, Summary]:
    """A replay's served steps, each at its period, and its summary."""
    rows = serving_rows(res.step_rows or [], res.log.start, res.log.duration, res.log.running)
    return rows, summarize(policy, workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)


def calibrate(
    runner: Any,
    grid: Profile,
    window: CalibrationWindow,
    slo: SLO,
    name: str,
    command: str,
    progress: Callable[[str, int, int], None] | None = None,
    policies: Sequence[str] = POLICIES,
) -> Calibration:
    """Replay the calibration window once per policy on ``runner`` (planning with ``grid`` for ``slo``), and
    refit."""
    requests, qps = len(window.workload), window.qps
    rows: list[np.ndarray] = []
    replays: list[dict[str, Any]] = []
    for p, res in _replay_each(runner, grid, window.workload, slo, policies, progress):
        if isinstance(res, str):
            replays.append({"policy": p, "skipped": res})
            continue
        served, s = _served(p, window.workload, res)
        rows.append(served)
        replays.append({"policy": p, "steps": res.iterations, "slo_attainment": round(s.slo_attainment, 4)})
    if not rows:
        raise ProfileError(f"no policy could plan for the calibration SLO on the grid profile: {replays}")
    steps = np.vstack(rows)
    replayed = ", ".join(r["policy"] for r in replays if "steps" in r)
    what = (
        f"the grid, then one replay per policy ({replayed}) of the first {requests} {WORKLOAD} requests "
        f"at {qps} req/s ({LOAD_SHARE:.0%} of the grid profile's simulated capacity), each step priced at its period"
    )
    prof, report = serving_profile(grid, steps, name, f"{command}: {what}")
    record = {
        "workload": WORKLOAD,
        "requests": requests,
        "qps": qps,
        "grid_sim_capacity_qps": window.sim_capacity_qps,
        "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
        "replays": replays,
        "steps": len(steps),
    }
    prof = replace(prof, fit={**(prof.fit or {}), "calibration": record})
    return Calibration(prof, report, steps, record)


def validate(
    runner: Any,
    prof: Profile,
    window: CalibrationWindow,
    slo: SLO,
    progress: Callable[[str, int, int], None] | None = None,
    policies: Sequence[str] = POLICIES,
) -> Validation:
    """Replay the held-out ``window`` once per policy on ``runner``, planning with ``prof`` for ``slo``; set each
    replay beside the simulator's run of the same requests on ``prof``, and ``prof``'s price of every served step
    beside its period."""
    rows: list[np.ndarray] = []
    cells: list[dict[str, Any]] = []
    for p, res in _replay_each(runner, prof, window.workload, slo, policies, progress):
        if isinstance(res, str):
            cells.append({"policy": p, "skipped": res})
            continue
        served, engine = _served(p, window.workload, res)
        rows.append(served)
        sim = Experiment(window.workload, prof, slo, max_model_len=runner.max_context).run(p).summary
        cells.append(_side_by_side(p, len(served), engine, sim))
    if not rows:
        raise ProfileError(f"no policy could plan for the validation SLO on profile {prof.name}: {cells}")
    steps = np.vstack(rows)
    return Validation(steps, validation_record(window, slo, cells, period_mape(prof.cost_model(), steps)))


def _side_by_side(policy: str, steps: int, engine: Summary, sim: Summary) -> dict[str, Any]:
    """One policy's SLO attainment and P99 TTFT on the engine and in the simulator, and the gap in points."""

    def measures(s: Summary) -> dict[str, float | None]:
        p99 = s.ttft.p99  # NaN when no request was answered
        return {
            "slo_attainment": round(s.slo_attainment, 4),
            "ttft_p99_s": round(p99, 4) if math.isfinite(p99) else None,
        }

    gap = round(100 * (sim.slo_attainment - engine.slo_attainment), 2)
    return {"policy": policy, "steps": steps, "engine": measures(engine), "sim": measures(sim), "gap_pts": gap}


def validation_record(
    window: CalibrationWindow, slo: SLO, cells: list[dict[str, Any]], mape: dict[str, float | None]
) -> dict[str, Any]:
    """What a profile's fit records as its validation, and the verdict: passed when every replayed policy's
    simulated SLO attainment is within ``ATTAINMENT_TOLERANCE_PTS`` of the engine's and the held-out steps are
    priced within ``STEP_MAPE_TOLERANCE``."""
    n, start = len(window.workload), window.start
    gap = max(abs(c["gap_pts"]) for c in cells if "gap_pts" in c)
    passed = gap <= ATTAINMENT_TOLERANCE_PTS and (mape["all"] or 0.0) <= STEP_MAPE_TOLERANCE
    kinds = ", ".join(f"{k} {'-' if mape[k] is None else f'{mape[k]:.1%}'}" for k in ("decode", "prefill"))
    verdict = (
        f"{'passed' if passed else 'FAILED'}: simulated SLO attainment within {gap:.1f} points of the engine on the "
        f"held-out window (tolerance {ATTAINMENT_TOLERANCE_PTS:g} points); step-period MAPE {kinds} "
        f"(tolerance {STEP_MAPE_TOLERANCE:.0%} over all steps)"
    )
    return {
        "window": {
            "workload": WORKLOAD,
            "start": start,
            "requests": n,
            "held_out": f"requests {start}-{start + n - 1} of the trace; the calibration replays its first ones",
        },
        "load": {
            "qps": window.qps,
            "share_of_sim_capacity": VALIDATION_LOAD,
            "sim_capacity_qps": window.sim_capacity_qps,
        },
        "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
        "planning": "this profile, on the engine and in the simulator",
        "policies": cells,
        "step_mape": {**mape, "steps": sum(c.get("steps", 0) for c in cells)},
        "max_gap_pts": gap,
        "passed": passed,
        "verdict": verdict,
    }
