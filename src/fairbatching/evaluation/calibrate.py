"""Serving calibration on the engine: the profiling grid's cost model refitted on the steps real replays ran.

The calibration window is the first requests of the Azure conversation trace (seed 0 of its family: the
window capacity searches on the GPU leave out), replayed once per policy at 85% of the grid profile's
simulated capacity for FairBatching, so the steps span light and heavy batches without the queue running
away. Every served step, priced at its period (``costmodel.serving``), refits the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.costmodel.fit import FitReport
from fairbatching.costmodel.profile import Profile
from fairbatching.costmodel.serving import serving_profile, serving_rows
from fairbatching.errors import ConfigError, ProfileError
from fairbatching.evaluation.capacity import bracket_search
from fairbatching.metrics.summary import summarize
from fairbatching.policies import make_policy
from fairbatching.runs import Experiment
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload

WORKLOAD = "azure-conv"
POLICIES = ("fairbatching", "sarathi", "vllm")
LOAD_SHARE = 0.85  # of the grid profile's simulated capacity
STEP_COLUMNS = ("new_tokens", "context_tokens", "num_seqs", "attn_work", "period")


@dataclass
class Calibration:
    profile: Profile
    report: FitReport
    steps: np.ndarray  # one row per served step: STEP_COLUMNS
    record: dict[str, Any] = field(default_factory=dict)  # what was done, as the profile's fit records it


@dataclass(frozen=True)
class CalibrationWindow:
    """The requests replayed, the load they are replayed at, and the simulated capacity that load came from."""

    workload: Workload
    qps: float
    sim_capacity_qps: float


def calibration_window(grid: Profile, requests: int, max_context: int, slo: SLO) -> CalibrationWindow:
    """The first ``requests`` of the trace at ``LOAD_SHARE`` of ``grid``'s simulated capacity for FairBatching
    (>= 90% of requests meeting ``slo``)."""
    fam = family(WORKLOAD)

    def meets(qps: float) -> bool:
        exp = Experiment(fam.build(qps, 0, requests), grid, slo, max_model_len=max_context)
        return exp.run("fairbatching").summary.slo_attainment >= 0.9

    capacity, _ = bracket_search(meets, 4.0, 0.03, 14)
    qps = round(LOAD_SHARE * capacity, 2) if capacity > 0 else 1.0
    return CalibrationWindow(fam.build(qps, 0, requests), qps, capacity)


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
    from fairbatching.engine.loop import replay

    requests, qps = len(window.workload), window.qps
    cost = grid.cost_model()
    rows: list[np.ndarray] = []
    replays: list[dict[str, Any]] = []
    for p in policies:
        try:
            policy = make_policy(p, cost, tpot_slo=slo.tpot)
        except ConfigError as exc:  # e.g. Sarathi's token budget: no batch fits the TPOT SLO on this profile
            replays.append({"policy": p, "skipped": str(exc)})
            continue
        step = None if progress is None else lambda d, t, p=p: progress(p, d, t)
        res = replay(runner, policy, cost, window.workload, slo, progress=step)
        rows.append(serving_rows(res.step_rows or [], res.log.start, res.log.duration, res.log.running))
        s = summarize(p, window.workload.name, res.requests, res.end_time, res.busy_time, res.preemptions)
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
