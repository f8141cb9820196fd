"""Profiles: a fitted cost model plus the model, hardware and KV capacity it describes, as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fairbatching.core.kv import KVCacheConfig
from fairbatching.core.request import SLO
from fairbatching.costmodel.model import CostModel, CostParams
from fairbatching.costmodel.roofline import H100_SXM, LLAMA3_8B, HardwareSpec, ModelShape, roofline_params
from fairbatching.errors import ConfigError, ProfileError

ANALYTIC_PROFILE = "llama-3-8b-h100-analytic"  # roofline estimate, computed in code
DEFAULT_PROFILE = "llama-3-8b-h100-engine"  # measured on our GPU engine (results/gpu-engine)
PROFILE_FIELDS = ("name", "source", "model", "hardware", "params", "kv", "fit", "note", "extra")
# Every cost parameter but p is seconds per unit of work (a step, a sequence, a token): over an hour is a unit
# mistake, and far larger values overflow the model's power mean. p is bounded where the fit bounds it.
MAX_COST_S = 3600.0
MAX_P = 32.0


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    model: dict[str, Any]
    hardware: dict[str, Any]
    params: CostParams
    kv: KVCacheConfig
    fit: dict[str, Any] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cost_model(self) -> CostModel:
        return CostModel(self.params)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "model": self.model,
            "hardware": self.hardware,
            "params": asdict(self.params),
            "kv": {"num_blocks": self.kv.num_blocks, "block_size": self.kv.block_size},
            "fit": self.fit,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str = "<json>") -> Profile:
        _check_fields(data, origin)
        try:
            profile = cls(
                name=data["name"],
                source=data["source"],
                model=dict(data.get("model", {})),
                hardware=dict(data.get("hardware", {})),
                params=CostParams(**data["params"]),
                kv=KVCacheConfig(**data["kv"]),
                fit=data.get("fit"),
                note=data.get("note", ""),
                extra=dict(data.get("extra", {})),
            )
        except KeyError as exc:
            raise ProfileError(f"{origin}: profile is missing the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{origin}: malformed profile: {exc}") from None
        _check_usable(profile, origin)
        return profile

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read profile: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ProfileError(f"{path}: not a JSON profile (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: a profile must be a JSON object")
        return cls.from_json(data, origin=str(path))


def _check_fields(data: dict[str, Any], origin: str) -> None:
    """Refuse an unknown, mistyped or out-of-range field by name: otherwise it is ignored, becomes a silent
    default, or ends a run in a traceback."""
    unknown = [key for key in data if key not in PROFILE_FIELDS]
    if unknown:
        raise ProfileError(
            f"{origin}: unknown profile field(s) {', '.join(map(repr, unknown))}; expected {', '.join(PROFILE_FIELDS)}"
        )
    for key, value in data.items():
        kind = str if key in ("name", "source", "note") else dict
        if key != "fit" and not isinstance(value, kind):
            raise ProfileError(f"{origin}: {key} must be {'a string' if kind is str else 'an object'}, got {value!r}")
    for key, value in data.get("kv", {}).items():
        if key in ("num_blocks", "block_size") and (isinstance(value, bool) or not isinstance(value, int)):
            raise ProfileError(f"{origin}: kv.{key} must be a whole number, got {value!r}")
    for key, value in data.get("params", {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProfileError(f"{origin}: params.{key} must be a number, got {value!r}")
        high = MAX_P if key == "p" else MAX_COST_S
        if not (math.isfinite(value) and value <= high):
            raise ProfileError(f"{origin}: params.{key} must be finite and at most {high:g}, got {value!r}")
    _check_fit(data.get("fit"), origin)


def _check_fit(fit: object, origin: str) -> None:
    """The fit section is a free-form record, but `profiles` shows its validation verdict: refuse a shape it
    cannot show, at load, rather than when it is listed."""
    if fit is None:
        return
    if not isinstance(fit, dict):
        raise ProfileError(f"{origin}: fit must be an object or null, got {fit!r}")
    check = fit.get("validation")
    if check is None:
        return
    if not isinstance(check, dict):
        raise ProfileError(f"{origin}: fit.validation must be an object, got {check!r}")
    passed, gap = check.get("passed"), check.get("max_gap_pts")
    if not isinstance(passed, bool):
        raise ProfileError(f"{origin}: fit.validation.passed must be true or false, got {passed!r}")
    if isinstance(gap, bool) or not isinstance(gap, int | float) or not math.isfinite(gap):
        raise ProfileError(f"{origin}: fit.validation.max_gap_pts must be a finite number, got {gap!r}")


def _check_usable(profile: Profile, origin: str) -> None:
    """Refuse a cost model that prices work as free (every run on it would report zero latency and 100% SLO),
    or that overflows on a batch the KV cache holds (the run would end in a traceback)."""
    cost = profile.cost_model()
    cap = profile.kv.capacity_tokens
    try:
        step, prefill, filled = (cost.predict(n, n, 1, n * (n + 1) / 2) for n in (1, 2048, cap))
    except OverflowError:
        step = prefill = filled = math.inf
    if not math.isfinite(filled):
        raise ProfileError(
            f"{origin}: the cost model overflows pricing one prompt that fills the {cap:,}-token KV cache: "
            "its params are too large"
        )
    if not (math.isfinite(step) and step > 0):
        raise ProfileError(f"{origin}: the cost model prices a one-token decode step at {step!r} s; need > 0")
    if not (math.isfinite(prefill) and prefill > step):
        raise ProfileError(
            f"{origin}: the cost model prices a 2048-token prefill ({prefill!r} s) no higher than a one-token "
            f"decode ({step!r} s): its token and attention coefficients are zero"
        )


def fastest_decode_step(cost: CostModel) -> float:
    """One lone decode step: the floor under any TTFT or TPOT a schedule can meet."""
    return cost.predict(1, 1, 1, 1.0)


def check_slo_feasible(slo: SLO, profile: Profile, names: tuple[str, str] = ("TTFT SLO", "TPOT SLO")) -> None:
    """Reject SLOs no schedule can meet on this hardware: a TTFT or TPOT below one lone decode step.

    ``names``: what the caller's message calls the TTFT and the TPOT (an option, a setting and its source)."""
    step = fastest_decode_step(profile.cost_model())
    for name, value in zip(names, (slo.ttft, slo.tpot), strict=True):
        if value < step:
            raise ConfigError(
                f"{name} {value * 1e3:.3g} ms is below the fastest possible decode step "
                f"({step * 1e3:.3g} ms on profile {profile.name}): no schedule can meet it"
            )


def _bundled() -> dict[str, Path]:
    folder = resources.files("fairbatching.costmodel") / "profiles"
    if not folder.is_dir():
        return {}
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def available_profiles() -> list[str]:
    return sorted({ANALYTIC_PROFILE, *_bundled()})


def analytic_profile(model: ModelShape = LLAMA3_8B, hw: HardwareSpec = H100_SXM) -> Profile:
    """A profile from the hardware roofline (``costmodel.roofline``), for use until a measured one exists."""
    return Profile(
        name=f"{model.name}-{hw.name.split('-')[0].lower()}-analytic",
        source="analytic",
        model=asdict(model),
        hardware=asdict(hw),
        params=roofline_params(model, hw),
        kv=KVCacheConfig.from_memory(hw.mem_bytes, model.weight_bytes, model.kv_bytes_per_token),
        note=(
            "ANALYTIC: derived from the hardware roofline (peak FLOPs and bandwidth times efficiency factors), "
            "not measured. Replace with a profile fitted on GPU measurements for real decisions."
        ),
    )


def profile_for_device(model: str, device: str) -> tuple[str, str]:
    """The bundled profile to plan ``model`` on GPU ``device`` (its CUDA name) with, and why: one measured on
    this GPU model with this model when there is one, else the default, named with where it was measured."""
    for name in sorted(_bundled()):
        p = load_profile(name)
        if p.model.get("name") == model and p.hardware.get("device") == device:
            return name, f"measured on this GPU model ({device})"
    default = load_profile(DEFAULT_PROFILE)
    where = default.hardware.get("device", "another GPU")
    return DEFAULT_PROFILE, (
        f"no bundled profile was measured with {model} on {device}; the default was measured on {where} "
        "(`fairbatching profile` measures this GPU)"
    )


def load_profile(name_or_path: str | None = None) -> Profile:
    """A bundled profile by name (default: the measured engine profile), the analytic one, or a JSON path."""
    name = name_or_path or DEFAULT_PROFILE
    bundled = _bundled()
    if name in bundled:
        return Profile.load(bundled[name])
    if name == ANALYTIC_PROFILE:
        return analytic_profile()
    if Path(name).is_file():
        return Profile.load(name)
    raise ConfigError(f"unknown profile {name!r}: not a file, and not one of {', '.join(available_profiles())}")
