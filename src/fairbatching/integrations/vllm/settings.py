"""Scheduler settings for the vLLM integration, with no vLLM import (so they are testable anywhere).

Three sources, later ones winning: a JSON or YAML file named by ``FAIRBATCHING_CONFIG``; vLLM's command line,
``--additional-config '{"fairbatching": {...}}'``; and one environment variable per setting:
``FAIRBATCHING_POLICY``, ``FAIRBATCHING_TTFT_SLO``, ``FAIRBATCHING_TPOT_SLO`` (seconds), ``FAIRBATCHING_PROFILE``
(bundled profile name or JSON path), ``FAIRBATCHING_CALIBRATION`` (``online`` or ``off``),
``FAIRBATCHING_METRICS_PORT`` and ``FAIRBATCHING_METRICS_HOST`` (serve the Prefill Admission Budget as Prometheus
gauges; host 127.0.0.1 unless told otherwise). ``policy_options`` comes from the file or the command line only.
Every value is checked before the engine starts; a bad one stops it with one line naming the value and
where it came from. A request overrides the SLO for itself through ``vllm_xargs``
(``SamplingParams.extra_args``): ``{"ttft_slo": 0.5, "tpot_slo": 0.05}``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fairbatching.core.modes import DEFAULT_SLO, Calibration
from fairbatching.core.request import SLO
from fairbatching.costmodel.model import CostModel
from fairbatching.costmodel.profile import DEFAULT_PROFILE, Profile, check_slo_feasible, load_profile
from fairbatching.errors import ConfigError, FairBatchingError
from fairbatching.policies import POLICIES, make_policy
from fairbatching.policies.base import Policy
from fairbatching.validate import check_policy_options

ENV_PREFIX = "FAIRBATCHING_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
ADDITIONAL_CONFIG_KEY = "fairbatching"  # vLLM's --additional-config '{"fairbatching": {...}}'
FILE_ONLY = ("policy_options",)


@dataclass(frozen=True)
class SchedulerSettings:
    policy: str = "fairbatching"
    ttft_slo: float = DEFAULT_SLO.ttft
    tpot_slo: float = DEFAULT_SLO.tpot
    profile: str | None = None
    calibration: Calibration = Calibration.ONLINE
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    policy_options: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each setting that is not a default came from, e.g. ``FAIRBATCHING_TTFT_SLO`` (for messages)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in _CHECKS:
                value = getattr(self, f.name)
                try:
                    object.__setattr__(self, f.name, _CHECKS[f.name](value))
                except (ConfigError, TypeError, ValueError) as exc:
                    raise ConfigError(f"fairbatching scheduler: {self.where(f.name, value)}: {exc}") from None
        try:
            check_policy_options(self.policy, dict(self.policy_options), origin="option")
        except ConfigError as exc:
            where = self.where("policy_options", self.policy_options)
            raise ConfigError(f"fairbatching scheduler: {where}: {exc}") from None
        try:
            self.load_profile()
        except FairBatchingError as exc:
            raise ConfigError(f"fairbatching scheduler: {self.where('profile', self.profile)}: {exc}") from None
        self._check_feasible()

    def where(self, name: str, value: Any) -> str:
        """``SOURCE=VALUE`` for messages: which setting, from where, holding what."""
        return f"{self.sources.get(name, name)}={value!r}"

    @property
    def default_slo(self) -> SLO:
        return SLO(self.ttft_slo, self.tpot_slo)

    def load_profile(self) -> Profile:
        return load_profile(self.profile)

    def _check_feasible(self) -> None:
        """An SLO below one lone decode step on the profile can never be met (every entry point's rule)."""
        ttft, tpot = (f"fairbatching scheduler: {self.where(n, getattr(self, n))}:" for n in ("ttft_slo", "tpot_slo"))
        check_slo_feasible(self.default_slo, self.load_profile(), (ttft, tpot))

    def make_policy(self, cost_model: CostModel, max_num_seqs: int, max_num_batched_tokens: int) -> Policy:
        """The configured policy, sized by vLLM's limits where it takes them and ``policy_options`` does not say
        otherwise, planning on ``cost_model`` corrected from the measured step times (``AdaptiveCostModel``)
        when calibration is online."""
        limits = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        try:
            calibrate = self.calibration is Calibration.ONLINE
            return make_policy(
                self.policy, cost_model, self.tpot_slo, calibrate, defaults=limits, **self.policy_options
            )
        except (ValueError, TypeError, ArithmeticError) as exc:  # ConfigError is a ValueError
            where = self.where("policy_options", self.policy_options)
            raise ConfigError(f"fairbatching scheduler: {where}: {exc}") from None

    def describe(self) -> str:
        """One line with every effective setting and, for those not at their default, where it came from."""
        profile = self.load_profile()
        metrics = f"http://{self.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off"
        origin = ", ".join(f"{k} from {v}" for k, v in sorted(self.sources.items())) or "all defaults"
        profile_source = "default" if self.profile is None else "set"
        return (
            f"policy={self.policy} ttft_slo={self.ttft_slo:g}s tpot_slo={self.tpot_slo:g}s "
            f"profile={profile.name} ({profile_source}) calibration={self.calibration} "
            f"policy_options={self.policy_options or {}} pab_metrics={metrics} [{origin}]"
        )

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, additional_config: Mapping[str, Any] | None = None
    ) -> SchedulerSettings:
        """Settings from the config file, vLLM's ``additional_config`` and the environment, in that order."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        path = env.get(CONFIG_ENV)
        if path:
            _merge(values, sources, _read_file(Path(path)), f"{path}: key ")
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if section is not None:
            if not isinstance(section, Mapping):
                raise ConfigError(
                    f"fairbatching scheduler: --additional-config {ADDITIONAL_CONFIG_KEY}={section!r}: "
                    "must be a mapping of fairbatching settings"
                )
            _merge(values, sources, section, f"--additional-config {ADDITIONAL_CONFIG_KEY}.")
        _check_env_names(env)
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if f.name in _CHECKS and f.name not in FILE_ONLY and name in env:
                values[f.name] = _from_env(f.name, env[name])
                sources[f.name] = name
        return cls(**values, sources=sources)


def _merge(values: dict[str, Any], sources: dict[str, str], data: Mapping[str, Any], prefix: str) -> None:
    known = [f.name for f in fields(SchedulerSettings) if f.name in _CHECKS]
    for key, value in data.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(
                f"fairbatching scheduler: {prefix}{key}: unknown setting"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}")
            )
        values[key] = value
        sources[key] = f"{prefix}{key}"


def _check_env_names(env: Mapping[str, str]) -> None:
    """A misspelled variable would be ignored without a word: refuse any FAIRBATCHING_* we do not read."""
    known = [CONFIG_ENV] + [ENV_PREFIX + n.upper() for n in _CHECKS if n not in FILE_ONLY]
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(
                f"fairbatching scheduler: {name}: unknown environment variable"
                + (f"; did you mean {hint[0]}?" if hint else f"; known: {', '.join(known)}")
            )


def _from_env(name: str, raw: str) -> Any:
    """An environment variable's text as the setting's type (then checked like any other value)."""
    where = f"fairbatching scheduler: {ENV_PREFIX}{name.upper()}={raw!r}"
    if name in ("ttft_slo", "tpot_slo"):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}: not a number of seconds") from None
    if name == "metrics_port":
        if not raw.strip().isdigit():
            raise ConfigError(f"{where}: not a port number")
        return int(raw)
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        where = f"{CONFIG_ENV}={str(path)!r}"
        raise ConfigError(f"{where}: cannot read the fairbatching scheduler config: {reason}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (or use a .json file)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    else:
        return json_mapping(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the fairbatching scheduler config must be a mapping")
    return data


def json_mapping(text: str, where: str) -> dict[str, Any]:
    """``text`` as a JSON object, or one line naming ``where``, the line and what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the fairbatching scheduler config must be a mapping, got {text.strip()[:40]!r}")
    return data


# -- value checks: each returns the value (normalized) or raises with what is wrong ---------------------------


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError("must be a positive finite number of seconds")
    return float(value)


def _policy(value: Any) -> str:
    if not isinstance(value, str) or value not in POLICIES:
        raise ConfigError(f"unknown policy; choose from {', '.join(POLICIES)}")
    return value


def _profile(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"must be a bundled profile name or a JSON path (default {DEFAULT_PROFILE})")
    return value


def _calibration(value: Any) -> Calibration:
    if not isinstance(value, str) or value not in tuple(Calibration):
        raise ConfigError("must be 'online' or 'off'")
    return Calibration(value)


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError("must be a TCP port number, 1-65535")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigError("must be an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
    return value


def _options(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError("must be a mapping of policy option names to values")
    return dict(value)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "policy": _policy,
    "ttft_slo": _seconds,
    "tpot_slo": _seconds,
    "profile": _profile,
    "calibration": _calibration,
    "metrics_port": _port,
    "metrics_host": _host,
    "policy_options": _options,
}


def request_slo(extra_args: Mapping[str, Any] | None, default: SLO, floor: float = 0.0) -> tuple[SLO, str | None]:
    """The request's SLO from its ``extra_args``, and a message naming the problem when they are invalid. Below
    ``floor`` (the profile's fastest decode step, as the defaults are checked against) no schedule can meet an SLO:
    a client asking for one would make its requests urgent forever, so the default applies."""
    if not extra_args or not ({"ttft_slo", "tpot_slo"} & set(extra_args)):
        return default, None
    ttft, tpot = extra_args.get("ttft_slo", default.ttft), extra_args.get("tpot_slo", default.tpot)
    try:
        slo = SLO(_seconds(ttft), _seconds(tpot))
    except ConfigError:
        return default, (
            f"invalid per-request SLO ttft_slo={ttft!r} tpot_slo={tpot!r} in vllm_xargs: "
            "each must be a positive finite number of seconds"
        )
    if min(slo.ttft, slo.tpot) < floor:
        return default, (
            f"per-request SLO ttft_slo={ttft!r} tpot_slo={tpot!r} in vllm_xargs is below the fastest possible decode "
            f"step ({floor * 1e3:.3g} ms): no schedule can meet it"
        )
    return slo, None
