"""Scheduler settings for the vLLM integration, with no vLLM import (so they are testable anywhere).

Read from a JSON or YAML file named by ``FAIRBATCHING_CONFIG``; single environment variables override the
file: ``FAIRBATCHING_POLICY``, ``FAIRBATCHING_TTFT_SLO``, ``FAIRBATCHING_TPOT_SLO`` (seconds),
``FAIRBATCHING_PROFILE`` (bundled profile name or JSON path), ``FAIRBATCHING_CALIBRATION`` (``online`` or
``off``) and ``FAIRBATCHING_METRICS_PORT`` (serve the Prefill Admission Budget as Prometheus gauges).
A request overrides the SLO for itself through ``vllm_xargs`` (``SamplingParams.extra_args``):
``{"ttft_slo": 0.5, "tpot_slo": 0.05}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError
from fairbatching.policies import POLICIES

ENV_PREFIX = "FAIRBATCHING_"


@dataclass(frozen=True)
class SchedulerSettings:
    policy: str = "fairbatching"
    ttft_slo: float = 2.0
    tpot_slo: float = 0.1
    profile: str | None = None
    calibration: str = "online"
    metrics_port: int | None = None
    policy_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"fairbatching scheduler: unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}"
            )
        if self.calibration not in ("online", "off"):
            raise ConfigError(
                f"fairbatching scheduler: calibration must be 'online' or 'off', got {self.calibration!r}"
            )
        SLO(self.ttft_slo, self.tpot_slo)  # raises a ConfigError naming the bad value
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"fairbatching scheduler: metrics_port must be a TCP port, got {self.metrics_port}")

    @property
    def default_slo(self) -> SLO:
        return SLO(self.ttft_slo, self.tpot_slo)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> SchedulerSettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_read_file(Path(path)))
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and f.name != "policy_options":
                values[f.name] = _parse(f.name, raw)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"fairbatching scheduler config: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"fairbatching scheduler config: {exc}") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fairbatching scheduler config: {exc.strerror}") from None
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the fairbatching scheduler config must be a mapping")
    return data


def _parse(name: str, raw: str) -> Any:
    if name in ("ttft_slo", "tpot_slo"):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r}: not a number of seconds") from None
    if name == "metrics_port":
        if not raw.isdigit():
            raise ConfigError(f"{ENV_PREFIX}METRICS_PORT={raw!r}: not a port number")
        return int(raw)
    return raw


def request_slo(extra_args: Mapping[str, Any] | None, default: SLO) -> tuple[SLO, str | None]:
    """The request's SLO from its ``extra_args``, and a message naming the problem when they are invalid
    (then the default SLO applies: a scheduler cannot refuse a request the frontend has accepted)."""
    if not extra_args or not ({"ttft_slo", "tpot_slo"} & set(extra_args)):
        return default, None
    ttft, tpot = extra_args.get("ttft_slo", default.ttft), extra_args.get("tpot_slo", default.tpot)
    try:
        ttft, tpot = float(ttft), float(tpot)
        if not (math.isfinite(ttft) and math.isfinite(tpot)):
            raise ValueError
        return SLO(ttft, tpot), None
    except (TypeError, ValueError, ConfigError):
        return default, f"invalid per-request SLO ttft_slo={ttft!r} tpot_slo={tpot!r}; using the default {default}"
