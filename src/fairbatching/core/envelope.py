"""Envelope-line SLO tracking.

Token 1 is due at ``arrival + TTFT``; token k at that plus ``(k - 1) * TPOT``. A request's slack is the
time left until its next token is due: positive means ahead of its envelope, negative means late.
Scheduling deadlines after the first token follow ``decode_anchor`` (re-anchored when the first token
was late); ``token_deadline`` is the SLO's own envelope, used to report envelope attainment.
"""

from __future__ import annotations

from fairbatching.core.request import Request, decode_anchor

__all__ = ["decode_anchor", "emission_slack", "is_urgent", "slack", "token_deadline"]


def token_deadline(request: Request, k: int) -> float:
    """Deadline of the k-th output token (1-based)."""
    if k < 1:
        raise ValueError(f"token index must be >= 1, got {k}")
    return request.first_deadline + (k - 1) * request.slo.tpot


def slack(request: Request, now: float) -> float:
    """Seconds until the request's next token is due (negative once it is late)."""
    return request.next_deadline - now


def is_urgent(request: Request, now: float, batch_time: float, next_batch_time: float | None = None) -> bool:
    """True if skipping this batch would make the next token late.

    Skipped, the token can come at best at the end of the following batch, ``now + batch_time +
    next_batch_time`` (``next_batch_time`` defaults to ``batch_time``).
    """
    follow = batch_time if next_batch_time is None else next_batch_time
    return request.next_deadline < now + batch_time + follow


def emission_slack(request: Request) -> list[float]:
    """For each emitted token, how far ahead of its deadline it came (negative = missed)."""
    first, tpot = request.first_deadline, request.slo.tpot
    return [first + i * tpot - t for i, t in enumerate(request.token_times)]
