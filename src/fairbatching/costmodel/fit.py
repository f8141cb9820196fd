"""Fitting the cost model to measured batches by least squares on relative error."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares, nnls

from fairbatching.costmodel.model import CostModel, CostParams, predict_with
from fairbatching.errors import ProfileError

ROW_FIELDS = ("new_tokens", "context_tokens", "num_seqs", "attn_work", "latency_s")
# A GPU step takes microseconds to seconds; a latency outside this range is a unit mistake, and values near
# zero overflow the relative-error fit.
MIN_LATENCY_S = 1e-6
MAX_LATENCY_S = 3600.0


@dataclass(frozen=True)
class FitReport:
    model: CostModel
    train_rows: int
    holdout_rows: int
    train_mape: float
    holdout_mape: float
    holdout_max_error: float

    def as_dict(self) -> dict[str, float]:
        return {
            "train_rows": self.train_rows,
            "holdout_rows": self.holdout_rows,
            "train_mape": self.train_mape,
            "holdout_mape": self.holdout_mape,
            "holdout_max_error": self.holdout_max_error,
        }


def load_profile_rows(path: str | Path) -> np.ndarray:
    """Rows ``[new_tokens, context_tokens, num_seqs, attn_work, latency_s]`` from a CSV or JSON(L) file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile rows: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a CSV or JSON text file (not UTF-8)") from None
    if path.suffix in (".json", ".jsonl"):
        records = _json_records(path, text)
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            missing = [f for f in ROW_FIELDS if f not in (reader.fieldnames or [])]
            if missing:
                raise ProfileError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
            records = [(i + 2, row) for i, row in enumerate(reader)]
        except csv.Error as exc:
            raise ProfileError(f"{path}: not a readable CSV file: {exc}") from None
    rows = []
    for line, rec in records:
        try:
            values = [float(rec[f]) for f in ROW_FIELDS]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProfileError(f"{path}: line {line}: bad or missing value ({exc})") from None
        if not all(np.isfinite(values)) or min(values) < 0 or values[2] < 1 or values[4] <= 0:
            raise ProfileError(f"{path}: line {line}: values must be finite, non-negative, with seqs >= 1")
        if not MIN_LATENCY_S <= values[4] <= MAX_LATENCY_S:
            raise ProfileError(
                f"{path}: line {line}: latency_s {values[4]:g} is outside [{MIN_LATENCY_S:g}, {MAX_LATENCY_S:g}] s"
            )
        rows.append(values)
    if not rows:
        raise ProfileError(f"{path}: no profile rows")
    return np.asarray(rows, dtype=float)


def _json_records(path: Path, text: str) -> list[tuple[int, dict]]:
    lines = text.splitlines()
    try:
        if path.suffix == ".jsonl":
            records = [(i + 1, json.loads(s)) for i, s in enumerate(lines) if s.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    if path.suffix != ".jsonl":
        if isinstance(data, dict):
            data = data.get("rows", [])
        if not isinstance(data, list):
            raise ProfileError(f"{path}: expected a JSON list of row objects, or an object with a 'rows' list")
        records = [(i + 1, r) for i, r in enumerate(data)]
    for line, rec in records:
        if not isinstance(rec, dict):
            raise ProfileError(f"{path}: row {line}: expected an object with fields {', '.join(ROW_FIELDS)}")
    return records


def _mape(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    err = np.abs(predict_with(theta, x) - y) / y
    return float(err.mean()), float(err.max())


def additive_design(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The additive model (p = 1) on relative error: ``design @ coef ~= 1`` for coefficients
    [fixed, per sequence, per context token, per new token, per attention pair, mixed-step price]."""
    mixed = (x[:, 0] > x[:, 2]).astype(float)
    return np.column_stack([np.ones(len(x)), x[:, 2], x[:, 1], x[:, 0], x[:, 3], mixed]) / y[:, None]


def fit_cost_model(rows: np.ndarray, holdout_fraction: float = 0.2, seed: int = 0) -> FitReport:
    """Fit on a random split and report error on the held-out rows.

    The additive model (p = 1) is fitted first by non-negative least squares; that seeds a bounded
    nonlinear least-squares fit of all parameters, from a few starting sharpness values, on relative
    residuals, so short decode steps weigh as much as long prefills.
    """
    rows = _checked_rows(rows, holdout_fraction)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_hold = max(1, int(round(len(rows) * holdout_fraction)))
    hold, train = rows[order[:n_hold]], rows[order[n_hold:]]
    if len(train) < 8:
        raise ProfileError(f"holding out {n_hold} of {len(rows)} rows leaves {len(train)} to fit 8 parameters")
    x, y = train[:, :4], train[:, 4]
    theta = _least_squares_theta(x, y)
    model = CostModel(CostParams(*map(float, theta)))
    train_mape, _ = _mape(theta, x, y)
    hold_mape, hold_max = _mape(theta, hold[:, :4], hold[:, 4])
    return FitReport(model, len(train), len(hold), train_mape, hold_mape, hold_max)


def _checked_rows(rows: np.ndarray, holdout_fraction: float) -> np.ndarray:
    """The rows as floats, refused with the reason when no fit could mean anything on them."""
    rows = np.asarray(rows, dtype=float)
    if rows.ndim != 2 or rows.shape[1] != len(ROW_FIELDS):
        raise ProfileError(f"profile rows must have {len(ROW_FIELDS)} columns: {', '.join(ROW_FIELDS)}")
    if len(rows) < 10:
        raise ProfileError(f"need at least 10 profile rows to fit 8 parameters and hold some out, got {len(rows)}")
    if not 0 < holdout_fraction < 1:
        raise ProfileError(f"the held-out fraction must be in (0, 1), got {holdout_fraction!r}")
    # Rows that barely vary (e.g. one batch measured 20 times) fit many parameter sets perfectly: the error
    # would read 0% and the parameters mean nothing. Attention work may follow new tokens; the rest must vary.
    spanned = np.linalg.matrix_rank(np.column_stack([np.ones(len(rows)), rows[:, [2, 1, 0, 3]]]))
    if spanned < 4:
        raise ProfileError(
            f"the {len(rows)} profile rows vary along only {spanned - 1} of sequences, context, new tokens and "
            "attention work; the fit needs batches that differ in at least three of them"
        )
    return rows


def _least_squares_theta(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The parameters (``CostParams`` order): the additive NNLS fit seeds a bounded nonlinear fit on relative
    residuals, from several starting sharpness values."""
    lin, _ = nnls(additive_design(x, y), np.ones(len(y)))
    # Free parameters, scaled to ~1: t_fixed, c_seq, t_weights, c_kv, c_tok, c_attn, t_mixed; then p.
    base = np.array([lin[0] * 0.5, lin[1], lin[0] * 0.5, lin[2], lin[3], lin[4], lin[5]])
    scale = np.maximum(np.abs(base), 1e-12)

    def theta_of(z: np.ndarray) -> np.ndarray:
        v = z[:-1] * scale
        return np.concatenate([v[:6], [z[-1]], v[6:]])  # CostParams order: ..., c_attn, p, t_mixed

    def residual(z: np.ndarray) -> np.ndarray:
        return predict_with(theta_of(z), x) / y - 1.0

    best = None
    for p0 in (1.0, 2.0, 4.0, 8.0):
        z0 = np.append(np.maximum(base / scale, 1e-6), p0)
        sol = least_squares(residual, z0, bounds=(np.append(np.zeros(7), 1.0), np.append(np.full(7, np.inf), 32.0)))
        if best is None or sol.cost < best.cost:
            best = sol
    assert best is not None  # the loop above ran
    return theta_of(best.x)
