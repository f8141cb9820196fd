"""Envelope-line SLO tracking: the one definition of deadlines, slack and urgency that policies use.

Token 1 is due at ``arrival + TTFT``; token k at that plus ``(k - 1) * TPOT``. A request's slack is the
time left until its next token is due: positive means ahead of its envelope, negative means late.
Scheduling deadlines after the first token follow ``decode_anchor`` (re-anchored when the first token
was late); ``token_deadline`` is the SLO's own envelope, used to report envelope attainment. The functions
take scalars or NumPy arrays alike (token indices, deadlines), so a policy can classify a whole batch in
one pass: ``count_urgent`` over the decodes' deadlines in order is what FairBatching runs.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fairbatching.core.request import Request, decode_anchor

__all__ = [
    "count_urgent",
    "decode_anchor",
    "emission_slack",
    "is_urgent",
    "slack",
    "token_deadline",
    "urgency_cutoff",
]


def token_deadline(request: Request, k: int | np.ndarray) -> float | np.ndarray:
    """Deadline of the k-th output token (1-based; ``k`` may be an array of indices)."""
    if np.any(np.asarray(k) < 1):
        raise ValueError(f"token index must be >= 1, got {k}")
    return request.first_deadline + (k - 1) * request.slo.tpot


def slack(request: Request, now: float | np.ndarray) -> float | np.ndarray:
    """Seconds until the request's next token is due (negative once it is late)."""
    return request.next_deadline - now


def urgency_cutoff(now: float, batch_time: float, next_batch_time: float | None = None) -> float:
    """Next-token deadlines before this are urgent: skipped in this batch, a token can come at best at the
    end of the following one, ``now + batch_time + next_batch_time`` (``next_batch_time`` defaults to
    ``batch_time``)."""
    follow = batch_time if next_batch_time is None else next_batch_time
    return now + batch_time + follow


def is_urgent(request: Request, now: float, batch_time: float, next_batch_time: float | None = None) -> bool:
    """True if skipping this batch would make the next token late (see ``urgency_cutoff``)."""
    return request.next_deadline < urgency_cutoff(now, batch_time, next_batch_time)


def count_urgent(
    deadlines: Sequence[Any] | np.ndarray,
    now: float,
    batch_time: float,
    next_batch_time: float | None = None,
    key: Callable[[Any], float] | None = None,
) -> int:
    """How many of ``deadlines`` (next-token deadlines, ascending; or requests in that order with ``key``
    giving the deadline) are urgent: they are a prefix."""
    return bisect_left(deadlines, urgency_cutoff(now, batch_time, next_batch_time), key=key)


def emission_slack(request: Request) -> list[float]:
    """For each emitted token, how far ahead of its deadline it came (negative = missed)."""
    first, tpot = request.first_deadline, request.slo.tpot
    return [first + i * tpot - t for i, t in enumerate(request.token_times)]
