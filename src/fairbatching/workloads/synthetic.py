"""Synthetic workloads: Poisson or Gamma (bursty) arrivals with lognormal length distributions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError
from fairbatching.workloads.spec import RequestSpec, Workload


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Lognormal lengths with a given median and spread (sigma of the log), clipped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int = 1
    hi: int = 32768

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.median <= 0 or self.sigma < 0 or not 1 <= self.lo <= self.hi:
            raise ConfigError(f"bad length distribution {self}")
        x = rng.lognormal(np.log(self.median), self.sigma, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(int)


# Shapes close to the Azure 2023 conversation trace (prompt median ~1k, output median ~130 tokens).
CONVERSATION_PROMPTS = LengthDist(median=1000, sigma=0.9, lo=16, hi=16384)
CONVERSATION_OUTPUTS = LengthDist(median=130, sigma=1.0, lo=4, hi=2048)


def synthetic_workload(
    num_requests: int,
    qps: float,
    prompt: LengthDist = CONVERSATION_PROMPTS,
    output: LengthDist = CONVERSATION_OUTPUTS,
    burstiness: float = 1.0,
    seed: int = 0,
    name: str | None = None,
    slo_classes: Sequence[tuple[float, SLO]] = (),
) -> Workload:
    """Arrivals with Gamma inter-arrival times, scaled so the mean rate is exactly ``qps``.

    ``burstiness`` is the squared coefficient of variation of the gaps: 1 is Poisson, above 1 clusters
    arrivals into bursts (shape = 1 / burstiness), below 1 spaces them more evenly. ``slo_classes``
    (weight, SLO) pairs give each request an SLO drawn by weight, e.g. interactive and relaxed tenants;
    without them requests take the experiment's default SLO.
    """
    if num_requests < 1:
        raise ConfigError(f"num_requests must be >= 1, got {num_requests}")
    if not qps > 0:
        raise ConfigError(f"qps must be positive, got {qps}")
    if not burstiness > 0:
        raise ConfigError(f"burstiness must be positive, got {burstiness}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness
    gaps = rng.gamma(shape, 1.0 / (qps * shape), num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    prompts = prompt.sample(rng, num_requests)
    outputs = output.sample(rng, num_requests)
    slos: list[SLO | None] = [None] * num_requests
    if slo_classes:
        weights = np.array([w for w, _ in slo_classes], dtype=float)
        if (weights <= 0).any():
            raise ConfigError("SLO class weights must be positive")
        picks = rng.choice(len(slo_classes), size=num_requests, p=weights / weights.sum())
        slos = [slo_classes[k][1] for k in picks]
    reqs = tuple(
        RequestSpec(f"r{i}", float(t), int(p), int(o), s)
        for i, (t, p, o, s) in enumerate(zip(arrivals, prompts, outputs, slos, strict=True))
    )
    label = name or f"synthetic-gamma{burstiness:g}"
    meta = {"qps": qps, "burstiness": burstiness, "seed": seed, "kind": "synthetic"}
    # Bursty gaps make the realised rate noisy; stretch so the mean rate is exactly the one asked for.
    return Workload(label, reqs, meta).rescaled(qps)


def default_workload(num_requests: int = 2000, qps: float = 6.0, seed: int = 0) -> Workload:
    """The embedded default: conversation-like lengths with bursty arrivals (burstiness 4)."""
    return synthetic_workload(num_requests, qps, burstiness=4.0, seed=seed, name="default-conversation-bursty")
