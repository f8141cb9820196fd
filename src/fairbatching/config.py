"""Every policy setting's one home: one typed config per policy, each option with its type, default, range and help.

The CLI's ``-o policy.key=value`` (its check and ``fairbatching options``), the vLLM and Ray Serve settings,
the evaluation and the policy constructors all read these declarations; nothing else states a range or a
default. Adding an option is one ``option(...)`` line in its policy's config (and the constructor reading it).

The module imports nothing heavy (no numpy, no simulator): the CLI's ``--help`` reads it. The library's
default SLO and load live here for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from fairbatching.errors import ConfigError

DEFAULT_TTFT_S = 2.0
DEFAULT_TPOT_S = 0.1
# Load of the embedded default workload: the knee of the default (measured H100 engine) profile, where the
# policies' SLO attainment is ~90%, so scheduling decisions matter.
DEFAULT_QPS = 14.8

C = TypeVar("C", bound="PolicyConfig")


def option(default: Any, help: str, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> Any:
    """A config field: its default, a one-line help, and its range (``lo_open``: the low end excluded)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class Option:
    """One option as declared: the type comes from the field's annotation, ``None`` allowed if it says so."""

    name: str
    kind: type  # int, float or bool
    default: Any
    help: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    nullable: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo > -math.inf and self.hi < math.inf:
            what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo > -math.inf:
            what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        return what + (" (or null)" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi


@dataclass(frozen=True)
class PolicyConfig:
    """A policy's options; building one checks every value, naming the option and what it must be."""

    policy: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, opt in options_of(type(self)).items():
            value = getattr(self, name)
            if not opt.accepts(value):
                raise ConfigError(f"{self.policy}.{name}={value!r}: must be {opt.describe()}")
            if opt.kind is float and isinstance(value, int):
                object.__setattr__(self, name, float(value))

    @classmethod
    def resolve(cls: type[C], config: C | None = None, overrides: Mapping[str, Any] | None = None) -> C:
        """``config`` (default: the defaults) with ``overrides`` applied; an option not declared is refused."""
        base = cls() if config is None else config
        if not overrides:
            return base
        known = options_of(cls)
        for key in overrides:
            if key not in known:
                raise ConfigError(f"{cls.policy}.{key}: unknown option; {cls.policy} takes {', '.join(sorted(known))}")
        return replace(base, **overrides)


_DECLARED: dict[type[PolicyConfig], dict[str, Option]] = {}


def options_of(config: type[PolicyConfig]) -> dict[str, Option]:
    """The options ``config`` declares, in declaration order."""
    if config not in _DECLARED:
        _DECLARED[config] = _declared(config)
    return _DECLARED[config]


def _declared(config: type[PolicyConfig]) -> dict[str, Option]:
    hints = get_type_hints(config)
    out = {}
    for f in fields(config):
        kind, nullable = hints[f.name], False
        if get_origin(kind) in (Union, type(int | None)):
            args = [a for a in get_args(kind) if a is not type(None)]
            kind, nullable = args[0], True
        m = f.metadata
        out[f.name] = Option(f.name, kind, f.default, m["help"], m["lo"], m["hi"], m["lo_open"], nullable)
    return out


@dataclass(frozen=True)
class SeqLimit(PolicyConfig):
    max_num_seqs: int = option(256, "most requests holding KV at once (vLLM's max_num_seqs)", lo=1)


@dataclass(frozen=True)
class BatchLimits(SeqLimit):
    max_num_batched_tokens: int = option(8192, "most tokens in one step (vLLM's max_num_batched_tokens)", lo=1)


@dataclass(frozen=True)
class VLLMConfig(BatchLimits):
    policy: ClassVar[str] = "vllm"


@dataclass(frozen=True)
class PrefillFirstConfig(BatchLimits):
    policy: ClassVar[str] = "prefill-first"


@dataclass(frozen=True)
class SarathiConfig(SeqLimit):
    policy: ClassVar[str] = "sarathi"

    tpot_slo: float | None = option(
        None, "TPOT (s) the token budget is sized for; the run's TPOT SLO unless set", lo=0.0, lo_open=True
    )
    token_budget: int | None = option(None, "a fixed token budget per step instead of one sized from tpot_slo", lo=1)


@dataclass(frozen=True)
class FairBatchingConfig(BatchLimits):
    policy: ClassVar[str] = "fairbatching"

    max_batch_time: float | None = option(None, "cap on a step's predicted time (s)", lo=0.0, lo_open=True)
    min_chunk: int = option(32, "smallest partial prefill chunk worth scheduling (tokens)", lo=1)
    urgency_margin: float = option(1.0, "decode-only steps of lead a decode needs not to be urgent", lo=0.0)
    edf_window: int = option(128, "queued requests ordered by deadline each step (bounded look-ahead)", lo=1)
    slack_carry: float = option(
        0.0, "share of a first token's lead over its TTFT carried into decode deadlines", lo=0.0, hi=1.0
    )
    min_budget_fraction: float = option(
        0.5,
        "floor of a step's time budget, as a share of the tightest TPOT (above 1: trade TPOT for TTFT)",
        lo=0.0,
        hi=4.0,
    )
    kv_reserve_fraction: float = option(0.01, "share of the KV cache kept free when admitting", lo=0.0, hi=1.0)
    kv_high_watermark: float = option(
        0.5, "KV and slot use above which decodes stop yielding to prefills", lo=0.0, hi=1.0
    )
    yield_reserve: float = option(1.0, "TPOTs of slack a decode keeps beyond a step before it yields", lo=0.0)
    decode_grace: float = option(0.0, "TPOTs of grace before decode deadlines bind", lo=0.0)
    mixed_amortization: float = option(
        6.0, "a step's first prefill chunk must be worth this many t_mixed of prefill time", lo=0.0
    )
    late_last: bool = option(True, "serve prefills whose TTFT is lost after those that can still make it")
    queue_margin: float | None = option(
        0.5,
        "step budgets added to the queue's work when judging which prefills can still be on time (Moore-Hodgson);"
        " null: each judged alone",
        lo=0.0,
    )
    late_age_limit: float | None = option(
        None, "TTFT SLOs waited after which a lost prefill is back in deadline order", lo=0.0, lo_open=True
    )
    late_share: float = option(
        1.0,
        "most of each step's prefill time the aged lost prefills (late_age_limit) may take",
        lo=0.0,
        hi=1.0,
        lo_open=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_chunk > self.max_num_batched_tokens:
            raise ConfigError(
                f"fairbatching.min_chunk={self.min_chunk}: above max_num_batched_tokens={self.max_num_batched_tokens}, "
                "so no partial prefill could ever be scheduled"
            )


#: Every policy's config by the policy's name (the CLI's list of policies, in order).
POLICY_CONFIGS: dict[str, type[PolicyConfig]] = {
    c.policy: c for c in (FairBatchingConfig, SarathiConfig, VLLMConfig, PrefillFirstConfig)
}


def policy_config(policy: str) -> type[PolicyConfig]:
    try:
        return POLICY_CONFIGS[policy]
    except KeyError:
        raise ConfigError(f"unknown policy {policy!r}; choose from {', '.join(POLICY_CONFIGS)}") from None
