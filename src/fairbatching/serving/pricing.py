"""What simulated steps really cost, apart from what the policy believes they cost.

A simulator that prices steps with the policy's own model can never show a policy planning to the edge
of a model the hardware does not match. ``StepPricer`` prices with a (possibly different) profile and
perturbs it the ways serving departs from a profiling grid: a bias on steps carrying prefill, a per-step
host overhead, and per-step multiplicative noise, seeded so runs repeat exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from fairbatching.costmodel.model import CostModel
from fairbatching.errors import ConfigError


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True)
class StepError:
    """How executed steps depart from the pricing model: ``t * scale * (mixed_scale if prefill) * noise +
    overhead``, with ``noise`` log-normal of standard deviation ``noise`` (0: none)."""

    scale: float = 1.0
    mixed_scale: float = 1.0
    noise: float = 0.0
    overhead: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("scale", "mixed_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"step error {name} must be a positive finite number, got {value!r}")
        for name in ("noise", "overhead"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"step error {name} must be a finite number >= 0, got {value!r}")

    @property
    def is_exact(self) -> bool:
        return self.scale == self.mixed_scale == 1.0 and self.noise == self.overhead == 0.0


class StepPricer:
    """A ``predict``-compatible pricing model: the simulator's executor asks it what each step took."""

    __slots__ = ("model", "params", "error", "_rng", "_scale", "_mixed")

    def __init__(self, model: CostModel, error: StepError) -> None:
        self.model = model
        self.params = model.params
        self.error = error
        self._rng = random.Random(error.seed)
        self._scale = error.scale
        self._mixed = error.scale * error.mixed_scale

    def predict(self, new_tokens: float, context_tokens: float, num_seqs: int, attn: float) -> float:
        if num_seqs <= 0:
            return 0.0
        t = self.model.predict(new_tokens, context_tokens, num_seqs, attn)
        t *= self._mixed if new_tokens > num_seqs else self._scale
        if self.error.noise:
            t *= self._rng.lognormvariate(0.0, self.error.noise)
        return t + self.error.overhead


def pricing_model(model: CostModel, error: StepError | None) -> CostModel | StepPricer:
    """``model`` itself when steps cost exactly what it says (the fast path), else a perturbed pricer."""
    return model if error is None or error.is_exact else StepPricer(model, error)
