"""The modes a run is configured with, each defined once and checked when it is built, and the default SLO.

The enums are ``StrEnum``s: a mode compares equal to its name and serialises as it, so configs, JSON
output and cache keys read the same as when the modes were plain strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from fairbatching.config import DEFAULT_TPOT_S, DEFAULT_TTFT_S
from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError

DEFAULT_SLO = SLO(ttft=DEFAULT_TTFT_S, tpot=DEFAULT_TPOT_S)


class Admission(StrEnum):
    """What a node (or the cluster's router) does with a request its Prefill Admission Budget cannot fit."""

    NONE = "none"
    REJECT = "reject"
    DEFER = "defer"


class OnFailure(StrEnum):
    """What the cluster does with a failed node's requests that had not produced a token yet."""

    FAIL = "fail"
    RETRY = "retry"


class Calibration(StrEnum):
    """Whether a live scheduler corrects its cost model from measured step times."""

    ONLINE = "online"
    OFF = "off"


class Grid(StrEnum):
    """The compositions the GPU profiler measures: all of them, or a few for a smoke test."""

    FULL = "full"
    QUICK = "quick"


M = TypeVar("M", bound=StrEnum)


def parse_mode(kind: type[M], value: object, what: str) -> M:
    """``value`` as a ``kind``, or a ConfigError naming ``what`` and the choices."""
    try:
        return kind(value)  # type: ignore[arg-type]  # the ValueError below is the check
    except ValueError:
        names = [m.value for m in kind]
        choices = ", ".join(names[:-1]) + f" or {names[-1]}"
        raise ConfigError(f"{what} must be {choices}, got {value!r}") from None
