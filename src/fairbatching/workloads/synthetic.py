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


# Multi-turn chat: a few shared system prompts, user messages, model replies, and a user's pause per turn.
SYSTEM_PROMPTS = (400, 800, 1200, 2000)  # tokens; conversations pick one uniformly
USER_MESSAGES = LengthDist(median=150, sigma=0.8, lo=8, hi=2048)
MAX_CONVERSATION_PROMPT = 16384


def _covered(rows: list, n: int, start: float, conversations: int) -> bool:
    """Whether ``rows`` hold ``n`` arrivals before ``start`` (checked every 64 conversations: it sorts)."""
    if len(rows) < n or conversations % 64:
        return False
    return sorted(r[0] for r in rows)[n - 1] < start


def _conversation_turns(
    rng: np.random.Generator, conv: int, start: float, mean_turns: float, think_s: tuple[float, float]
) -> list[tuple[float, int, int, tuple[tuple[int, int], ...]]]:
    """Conversation ``conv``'s turns that arrive at or after time 0 (see ``conversation_workload``)."""
    system = int(rng.integers(len(SYSTEM_PROMPTS)))
    sys_len = SYSTEM_PROMPTS[system]
    turns = int(rng.geometric(1.0 / mean_turns))
    rows: list[tuple[float, int, int, tuple[tuple[int, int], ...]]] = []
    t, history = start, 0
    for _ in range(turns):
        user = int(USER_MESSAGES.sample(rng, 1)[0])
        output = int(CONVERSATION_OUTPUTS.sample(rng, 1)[0])
        prompt = sys_len + history + user
        if prompt + output > MAX_CONVERSATION_PROMPT:
            break
        if t >= 0:
            rows.append((t, prompt, output, ((-1 - system, sys_len), (conv, history + user + output))))
        history += user + output
        t += think_s[0] + rng.exponential(think_s[1])
    return rows


def conversation_workload(
    num_requests: int,
    qps: float,
    seed: int = 0,
    name: str = "conversation",
    mean_turns: float = 4.0,
    think_s: tuple[float, float] = (5.0, 25.0),
) -> Workload:
    """Multi-turn conversations whose turns share their history, for prefix caching.

    Conversations start as Poisson arrivals at ``qps / mean_turns``, from well before time 0 so the window
    opens in steady state (its first turns may continue conversations begun before it, as a trace window
    does), and the arrivals are then stretched so the mean rate is exactly ``qps``.
    Each has a geometric number of turns (mean ``mean_turns``); turn k's prompt is the conversation's system
    prompt, every earlier user message and reply, and its own message; it arrives a pause after turn k-1
    (``think_s[0]`` plus an exponential of mean ``think_s[1]`` seconds: time to read the reply and type),
    independent of load. The request's ``prefix`` names that history (one segment per system prompt, one per
    conversation, offsets as positions), so turn k+1 can reuse turn k's prompt and reply blocks. A
    conversation ends early once a prompt would pass ``MAX_CONVERSATION_PROMPT`` tokens. The first
    ``num_requests`` requests by arrival are kept.
    """
    if num_requests < 1:
        raise ConfigError(f"num_requests must be >= 1, got {num_requests}")
    if not qps > 0:
        raise ConfigError(f"qps must be positive, got {qps}")
    if not mean_turns >= 1:
        raise ConfigError(f"mean_turns must be >= 1, got {mean_turns}")
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, int, int, tuple[tuple[int, int], ...]]] = []
    start = -2.0 * mean_turns * (think_s[0] + think_s[1])  # a conversation's span, twice over: steady state by 0
    conv = 0
    # Until the first ``num_requests`` arrivals after 0 are all drawn: a conversation's turns come after its start.
    while not _covered(rows, num_requests, start, conv):
        conv += 1
        start += rng.exponential(mean_turns / qps)
        rows += _conversation_turns(rng, conv, start, mean_turns, think_s)
    rows.sort(key=lambda r: r[0])
    kept = rows[:num_requests]
    t0 = kept[0][0]
    reqs = tuple(RequestSpec(f"c{i}", t - t0, p, o, prefix=segments) for i, (t, p, o, segments) in enumerate(kept))
    meta = {"qps": qps, "seed": seed, "kind": "multi-turn", "mean_turns": mean_turns}
    return Workload(name, reqs, meta).rescaled(qps)
