"""Serving calibration: a cost model fitted on the steps a serving loop actually ran, not only on a grid.

A profiling grid times each batch composition alone, after a warm-up, with nothing else on the host. A
serving loop pays more per step: building metadata for a new composition, graph-size padding, the
policy's own decision and the bookkeeping between steps. Pricing each served step at its *period* (from
its start to the next step's start while requests kept running) puts that host time into the model, so a
simulator priced with it runs its clock as the serving loop does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fairbatching.costmodel.fit import FitReport, fit_cost_model
from fairbatching.costmodel.model import CostModel
from fairbatching.costmodel.profile import Profile
from fairbatching.errors import ProfileError


def step_periods(start: Sequence[float], duration: Sequence[float], running: Sequence[int]) -> np.ndarray:
    """Each step's share of the loop's time: start to the next step's start while requests kept running (the
    step plus the host work after it), else the step alone (the loop then idled until an arrival)."""
    start_a, period = np.asarray(start, float), np.asarray(duration, float).copy()
    run = np.asarray(running)
    busy = (run[1:] > 0) & (run[:-1] > 0)
    period[:-1][busy] = (start_a[1:] - start_a[:-1])[busy]
    return period


def serving_rows(step_rows: Sequence[Sequence[float]], start, duration, running) -> np.ndarray:
    """Profile rows (new, context, seqs, attn work, seconds) of served steps, each priced at its period."""
    rows = np.asarray(step_rows, dtype=float)
    if rows.ndim != 2 or rows.shape[1] != 5 or len(rows) != len(start):
        raise ProfileError("serving calibration needs one (new, context, seqs, attn, seconds) row per logged step")
    rows[:, 4] = step_periods(start, duration, running)
    return rows


def serving_profile(grid: Profile, rows: np.ndarray, name: str, command: str) -> tuple[Profile, FitReport]:
    """``grid``'s profile refitted on served steps (at their periods); the fit and its provenance are recorded."""
    report = fit_cost_model(rows)
    fit = {**report.as_dict(), "rows_from": "serving steps at their periods", "grid_fit": grid.fit}
    note = f"serving-calibrated: {command}"
    return replace(grid, name=name, params=report.model.params, fit=fit, note=note), report


def period_mape(model: CostModel, rows: np.ndarray) -> dict[str, float | None]:
    """Mean absolute relative error of ``model``'s price against each served step's period (profile rows as
    ``serving_rows`` gives them), on decode-only steps, steps carrying prefill and all: the two kinds err
    differently, and a mean over all steps hides the rarer prefill steps (None where a kind has no steps)."""
    rows = np.asarray(rows, dtype=float)
    predicted = np.array([model.predict(a, b, int(c), d) for a, b, c, d in rows[:, :4].tolist()])
    err = np.abs(predicted / rows[:, 4] - 1.0)
    prefill = rows[:, 0] > rows[:, 2]  # more new tokens than sequences: some sequence is prefilling
    return {
        kind: float(err[m].mean()) if m.any() else None
        for kind, m in (("decode", ~prefill), ("prefill", prefill), ("all", np.ones(len(err), bool)))
    }
