"""Fitting the cost model to measured batches by least squares on relative error."""

from __future__ import annotations

import csv
import io
import json
import math
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
MIN_FIT_ROWS = 10  # 8 parameters, and some rows held out


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
    """Rows ``[new_tokens, context_tokens, num_seqs, attn_work, latency_s]`` from a CSV or JSON(L) file, enough
    to fit; a bad value is refused naming its line, field and value, since one bad row skews every parameter."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile rows: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a CSV or JSON text file (not UTF-8)") from None
    records = _json_records(path, text) if path.suffix in (".json", ".jsonl") else _csv_records(path, text)
    rows = [_row_values(path, where, rec) for where, rec in records]
    if len(rows) < MIN_FIT_ROWS:
        raise ProfileError(
            f"{path}: {len(rows)} profile rows; need at least {MIN_FIT_ROWS} to fit 8 parameters and hold some out"
        )
    return np.asarray(rows, dtype=float)


def _csv_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """Each row with its line in the file (the reader's ``line_num`` counts blank lines and the lines of quoted
    multi-line fields; a multi-line row reports its last line)."""
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [f for f in ROW_FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise ProfileError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise ProfileError(f"{path}: not a readable CSV file: {exc}") from None


def _json_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """Each row object with where it is: its line in a JSONL file, its place in a JSON list."""
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.split("\n"), start=1):  # read_text made every line end "\n"
            try:
                if line.strip():
                    records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ProfileError(f"{path}: line {n}: not valid JSON: {exc.msg}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
        if isinstance(data, dict):
            data = data.get("rows", [])
        if not isinstance(data, list):
            raise ProfileError(f"{path}: expected a JSON list of row objects, or an object with a 'rows' list")
        records = [(f"row {n}", r) for n, r in enumerate(data, start=1)]
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ProfileError(f"{path}: {where}: expected an object with fields {', '.join(ROW_FIELDS)}")
    return records


def _row_values(path: Path, where: str, rec: dict) -> list[float]:
    """One row's values in ``ROW_FIELDS`` order; the error names the field and the value."""
    values = []
    for name in ROW_FIELDS:
        raw = rec.get(name)
        try:
            if isinstance(raw, bool):
                raise TypeError
            value = float(raw)  # type: ignore[arg-type]  # anything float() refuses is the error below
        except (TypeError, ValueError, OverflowError):
            problem = "is missing" if raw is None else f"is not a number: {raw!r}"
            raise ProfileError(f"{path}: {where}: {name} {problem}") from None
        lowest = 1 if name == "num_seqs" else 0
        if not (math.isfinite(value) and value >= lowest):
            raise ProfileError(f"{path}: {where}: {name} must be a finite number >= {lowest}, got {raw!r}")
        values.append(value)
    if not MIN_LATENCY_S <= values[-1] <= MAX_LATENCY_S:
        raise ProfileError(
            f"{path}: {where}: latency_s {values[-1]:g} is outside [{MIN_LATENCY_S:g}, {MAX_LATENCY_S:g}] s"
        )
    return values


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
    if len(rows) < MIN_FIT_ROWS:
        raise ProfileError(
            f"need at least {MIN_FIT_ROWS} profile rows to fit 8 parameters and hold some out, got {len(rows)}"
        )
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
