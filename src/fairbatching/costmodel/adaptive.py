"""Planning under model error: a cost model that learns from the steps a backend actually ran.

A policy that fills each batch to the edge of a time budget (FairBatching does) turns every optimistic
prediction into a late step: a step priced at 50 ms that runs 60 ms makes the decodes in it late, late
decodes shrink the next budgets, and the node ends up running many small steps that each pay the fixed
costs again. ``AdaptiveCostModel`` wraps the prior model (a profile) and, from every executed step the
step loop feeds back, keeps the recent ratios of measured to predicted time, apart for decode-only steps
and steps carrying prefill (their errors differ: graph-replayed decodes are priced well, mixed steps pay
padding and eager attention the grid under-samples). It predicts the prior times a high quantile of those
ratios, so a plan that fits its budget under this model fits it on the hardware most of the time.

Every backend feeds it through ``Policy.observe_step`` (the simulator's and the GPU engine's step loop,
the vLLM scheduler), and every policy that derives a budget from a cost model plans on it, so baselines
and FairBatching see the same corrected model.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from fairbatching.costmodel.model import CostModel
from fairbatching.errors import ConfigError


def linear_quantile(values: list[float], q: float) -> float:
    """``np.quantile(values, q)`` (its default linear method, same operations, so the same bits) of a sorted
    list: in the step loop this runs every few steps, where NumPy's call overhead cost ten times the sort."""
    n = len(values)
    virtual = (n - 1) * q
    i = math.floor(virtual)
    gamma = virtual - i
    a, b = values[i], values[min(i + 1, n - 1)]
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


class AdaptiveCostModel:
    """The prior model scaled, per step kind, by a high quantile of recent measured/predicted ratios."""

    __slots__ = ("prior", "params", "quantile", "window", "min_steps", "_ratios", "_factor", "_since", "refresh_every")

    def __init__(
        self,
        prior: CostModel,
        quantile: float = 0.9,
        window: int = 256,
        min_steps: int = 16,
        refresh_every: int = 8,
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ConfigError(f"calibration quantile must be in (0, 1), got {quantile}")
        if window < min_steps or min_steps < 1 or refresh_every < 1:
            raise ConfigError("calibration needs window >= min_steps >= 1 and refresh_every >= 1")
        self.prior = prior
        self.params = prior.params  # policies read parameters (t_mixed) off the model they plan with
        self.quantile = quantile
        self.min_steps = min_steps
        self.refresh_every = refresh_every
        self.window = window
        # Measured/predicted ratios: [decode-only steps, steps carrying prefill].
        self._ratios: tuple[deque[float], deque[float]] = (deque(maxlen=window), deque(maxlen=window))
        self._factor = [1.0, 1.0]
        self._since = [0, 0]

    @property
    def factors(self) -> tuple[float, float]:
        """The current corrections: (decode-only steps, steps carrying prefill)."""
        return self._factor[0], self._factor[1]

    def predict(self, new_tokens: float, context_tokens: float, num_seqs: int, attn: float) -> float:
        t = self.prior.predict(new_tokens, context_tokens, num_seqs, attn)
        return t * self._factor[new_tokens > num_seqs]

    def observe(self, new_tokens: float, context_tokens: float, num_seqs: int, attn: float, seconds: float) -> bool:
        """Record one executed step; returns True when the correction for its kind changed."""
        predicted = self.prior.predict(new_tokens, context_tokens, num_seqs, attn)
        if num_seqs <= 0 or not (seconds > 0 and predicted > 0) or not math.isfinite(seconds):
            return False
        kind = int(new_tokens > num_seqs)
        ratios = self._ratios[kind]
        ratios.append(seconds / predicted)
        self._since[kind] += 1
        if len(ratios) < self.min_steps or self._since[kind] < self.refresh_every:
            return False
        self._since[kind] = 0
        factor = linear_quantile(sorted(ratios), self.quantile)
        changed = abs(factor / self._factor[kind] - 1) > 1e-3
        self._factor[kind] = factor
        return changed

    def observe_decodes(self, num_seqs: int, context: np.ndarray, seconds: np.ndarray) -> bool:
        """``observe`` for a run of decode-only steps (``num_seqs`` sequences at each ``context``), as the
        simulator's fast-forward replays them: the window and counters end as step-by-step observing leaves
        them, with one quantile for the last refresh instead of one per refresh. Returns True when the
        decode-only correction differs from the one before the run."""
        predicted = self.prior.predict_decodes(num_seqs, context)
        ok = (seconds > 0) & (predicted > 0) & np.isfinite(seconds)
        if num_seqs <= 0 or not ok.any():
            return False
        new = (seconds[ok] / predicted[ok]).tolist()
        ratios = self._ratios[0]
        k, held, since = len(new), len(ratios), self._since[0]
        # Step i (1-based) refreshes when the window holds min_steps ratios and refresh_every steps have
        # passed since the last refresh: from the first such step on, every refresh_every steps.
        first = max(self.min_steps - held, self.refresh_every - since, 1)
        if first > k:
            ratios.extend(new)
            self._since[0] = since + k
            return False
        last = first + (k - first) // self.refresh_every * self.refresh_every
        window = [*ratios, *new[:last]][-self.window :]
        ratios.extend(new)
        self._since[0] = k - last
        factor = linear_quantile(sorted(window), self.quantile)
        changed = abs(factor / self._factor[0] - 1) > 1e-3
        self._factor[0] = factor
        return changed
