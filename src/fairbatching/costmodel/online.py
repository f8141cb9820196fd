"""Online calibration: fit the cost model from the step times a serving engine reports, as it runs.

Starts from a prior model (a profile; the analytic default if none) and, once it has seen enough varied
steps, refits the additive model (p = 1, with the mixed-step term) by non-negative least squares on
relative error every ``refit_every`` steps over a sliding window, so it follows the engine it runs on.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.optimize import nnls

from fairbatching.costmodel.fit import additive_design
from fairbatching.costmodel.model import CostModel, CostParams


class OnlineCalibrator:
    def __init__(self, prior: CostModel, min_steps: int = 64, refit_every: int = 32, window: int = 4096) -> None:
        self.model = prior
        self.min_steps = min_steps
        self.refit_every = refit_every
        self.rows: deque[tuple[float, float, float, float, float]] = deque(maxlen=window)
        self.fits = 0
        self._since = 0

    def observe(self, new_tokens: int, context_tokens: int, num_seqs: int, attn_work: float, seconds: float) -> bool:
        """Record one step; returns True when the model was refitted."""
        if num_seqs <= 0 or not seconds > 0:
            return False
        self.rows.append((new_tokens, context_tokens, num_seqs, attn_work, seconds))
        self._since += 1
        if len(self.rows) >= self.min_steps and self._since >= self.refit_every:
            self._since = 0
            return self.refit()
        return False

    def refit(self) -> bool:
        x = np.asarray(self.rows, dtype=float)
        y = x[:, 4]
        design = additive_design(x[:, :4], y)
        if np.linalg.matrix_rank(design) < 3:  # too little variety yet (e.g. only idle decode steps)
            return False
        coef, _ = nnls(design, np.ones(len(y)))
        t0, c_seq, c_kv, c_tok, c_attn, t_mixed = map(float, coef)
        self.model = CostModel(CostParams(0.0, c_seq, t0, c_kv, c_tok, c_attn, 1.0, t_mixed))
        self.fits += 1
        return True

    def mape(self) -> float:
        """Mean relative error of the current model on the steps in the window."""
        if not self.rows:
            return float("nan")
        x = np.asarray(self.rows, dtype=float)
        pred = np.array([self.model.predict(*r[:4]) for r in x])
        return float(np.mean(np.abs(pred / x[:, 4] - 1)))
