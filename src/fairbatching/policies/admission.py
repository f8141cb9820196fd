"""Prefill Admission Budget (PAB): how much new prefill work a node can still take right now.

Derived from the same envelopes and cost model the policies use, so the simulator, an engine and a
router all see one quantity:
- keeping every running decode on its envelope costs one decode-only step of all of them per tightest
  TPOT: that share of the GPU is spoken for;
- the prefills already queued or in progress must finish within the horizon (a TTFT): their remaining
  work, priced at full-batch prefill throughput plus attention over their prior context, is spoken for
  (``tokens_within`` judges one request over its own TTFT, counting only the work due before it);
- what is left of the horizon is the budget in seconds. In tokens it is further capped by the KV blocks
  left after the decodes grow over the horizon, and it is zero when no sequence slot will be free within it:
  a full node (``max_num_seqs`` running and queued) still seats a request as running ones finish, at the rate
  they recently did (``SchedulerState.releases``); refusing on today's count alone turned away requests a
  full node of long decodes would have served in time.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from fairbatching.core.state import SchedulerState
from fairbatching.costmodel.model import BatchPricer, attn_work


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True, slots=True)
class AdmissionBudget:
    seconds: float  # GPU time free for new prefill work within the horizon
    tokens: int  # the same as prompt tokens, capped by free KV and sequence slots
    decode_share: float  # fraction of GPU time the running decodes need to stay on their envelopes
    queued_seconds: float  # prefill work already committed (queued or in progress)
    free_slots: int  # max_num_seqs less running and queued requests (negative: a queue waits for slots)
    horizon: float
    seconds_per_token: float = 0.0  # full-batch prefill price of a prompt token (0: not reported)
    kv_tokens: int = 0  # prompt tokens the free KV holds once the decodes have grown over the horizon
    keep: float = 1.0  # the share of this budget a router still trusts (a stale report is read down)
    # Queued prefill work by when its first token is due: (seconds from now, work due by then), ascending.
    queued_due: tuple[tuple[float, float], ...] = ()
    releases_per_s: float = 0.0  # how fast running requests recently finished (sequence slots freed)

    def slots_within(self, horizon: float) -> int:
        return slots_within(self.free_slots, self.releases_per_s, horizon)

    def fits(self, prompt_tokens: int) -> bool:
        """Whether a request whose TTFT is this budget's horizon fits: against the work due before it."""
        return prompt_tokens <= self.tokens_within(self.horizon)

    def tokens_within(self, horizon: float) -> int:
        """The budget in prompt tokens for a request whose first token is due ``horizon`` from now: the same
        split of GPU time over its own TTFT instead of the reported one, less only the queued prefill work
        due before it (what is due later is served after it, in deadline order). ``tokens`` itself counts
        all queued work: the node's load, which routers rank by."""
        if self.seconds_per_token <= 0:
            return self.tokens
        queued = queued_within(self.queued_due, horizon)
        if horizon == self.horizon and queued == self.queued_seconds:
            return self.tokens
        if self.slots_within(horizon) <= 0:
            return 0
        seconds = max(0.0, (1.0 - self.decode_share) * horizon - queued)
        return int(min(seconds / self.seconds_per_token, self.kv_tokens) * self.keep)


def queued_within(queued_due: tuple[tuple[float, float], ...], horizon: float) -> float:
    """Prefill work whose first token is due within ``horizon`` (``queued_due`` as in ``AdmissionBudget``;
    a nanosecond of slack keeps a request that arrived just now, due exactly one horizon out, inside)."""
    i = bisect.bisect_right(queued_due, (horizon + 1e-9, math.inf))
    return queued_due[i - 1][1] if i else 0.0


def slots_within(free_slots: int, releases_per_s: float, horizon: float) -> int:
    """Sequence slots free for a new request within ``horizon``: free now, plus those the recent finish rate
    frees by then (a node that has seen no finishes counts only what is free now)."""
    return free_slots + math.floor(releases_per_s * horizon)


def release_rate(releases: Sequence[float], now: float) -> float:
    """Finishes per second over the recorded ones (oldest first), counted up to ``now`` so that a node whose
    requests stopped finishing is read down; 0 with fewer than two."""
    n = len(releases)
    if n < 2:
        return 0.0
    span = now - releases[0]
    return (n - 1) / span if span > 0 else 0.0


def prefill_seconds_per_token(cost: BatchPricer, chunk: int) -> float:
    """Marginal GPU time of one prompt token when prefills run in full ``chunk``-token batches."""
    return cost.predict(chunk, chunk, 1, attn_work(chunk, 0)) / chunk


def prefill_admission_budget(
    state: SchedulerState, cost: BatchPricer, horizon: float, max_num_seqs: int, chunk: int = 8192
) -> AdmissionBudget:
    if horizon <= 0:
        raise ValueError("horizon must be positive")
    decodes = [r for r in state.running if r.is_decode]
    n = len(decodes)
    decode_share = 0.0
    growth_blocks = 0
    if n:
        ctx = sum(r.num_computed for r in decodes) + n
        min_tpot = min(r.tpot for r in decodes)
        decode_share = min(1.0, cost.predict(n, ctx, n, ctx) / min_tpot)
        tokens_each = math.ceil(horizon / min_tpot)
        growth_blocks = n * math.ceil(tokens_each / state.kv.block_size)
    per_token = prefill_seconds_per_token(cost, chunk)
    c_attn = cost.params.c_attn
    due: list[tuple[float, float]] = []
    for r in state.running + state.waiting:
        if not r.is_decode:
            remaining = r.num_tokens - r.num_computed
            due.append(
                (r.first_deadline - state.now, remaining * per_token + c_attn * attn_work(remaining, r.num_computed))
            )
    due.sort()
    queued_due = tuple(zip([d for d, _ in due], itertools.accumulate(w for _, w in due), strict=True))
    queued = queued_due[-1][1] if queued_due else 0.0
    seconds = max(0.0, (1.0 - decode_share) * horizon - queued)
    free_slots = max_num_seqs - len(state.running) - len(state.waiting)
    releases = release_rate(state.releases, state.now)
    kv_tokens = max(0, state.kv.free_blocks - growth_blocks) * state.kv.block_size
    seated = slots_within(free_slots, releases, horizon) > 0
    tokens = int(min(seconds / per_token, kv_tokens)) if seated else 0
    return AdmissionBudget(
        seconds,
        tokens,
        decode_share,
        queued,
        free_slots,
        horizon,
        per_token,
        kv_tokens,
        queued_due=queued_due,
        releases_per_s=releases,
    )
