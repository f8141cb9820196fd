"""Validation at the edges: command-line values, policy options and output folders, checked before any work.

Every check raises an error that names the value and where it came from, so the CLI can print one line and
exit 2; a value that passes here cannot turn into a silent wrong result or a traceback deep inside a run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from fairbatching.config import POLICY_CONFIGS, policy_config
from fairbatching.errors import ConfigError

# --- command-line option callbacks (typer turns BadParameter into "Invalid value for '--opt': ...", exit 2)


def _check(ok: Callable[[float], bool], what: str) -> Callable[[Any], Any]:
    def callback(value: Any) -> Any:
        if value is not None and not ok(value):
            raise typer.BadParameter(f"must be {what}, got {value!r}")
        return value

    return callback


positive = _check(lambda v: math.isfinite(v) and v > 0, "a positive finite number")
non_negative = _check(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
at_least_one = _check(lambda v: v >= 1, ">= 1")
at_least_two = _check(lambda v: v >= 2, ">= 2 (a prompt token and an output token)")
fraction = _check(lambda v: 0 < v <= 1, "in (0, 1]")
open_fraction = _check(lambda v: 0 < v < 1, "in (0, 1)")


def check_slo_seconds(option: str, item: str, ttft: float, tpot: float) -> None:
    """An SLO pair read from ``item`` of ``option`` (e.g. ``--slos 2:0.1``): both positive finite seconds."""
    if not all(math.isfinite(x) and x > 0 for x in (ttft, tpot)):
        raise ConfigError(f"{option} {item!r}: TTFT and TPOT must be positive finite seconds")


def comma_items(option: str, text: str) -> list[str]:
    """The items of a comma-separated option; none at all is an error, not a run of nothing."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"{option}: no values given")
    return items


def positive_list(option: str, text: str) -> list[float]:
    """A comma-separated list of positive finite numbers, e.g. ``--qps 12,14``."""
    values = []
    for item in comma_items(option, text):
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{option}: must be positive finite numbers, got {item!r}")
        values.append(v)
    return values


# --- policy options (-o policy.key=value, and any other place options come from): ranges live in config.py


def check_policy_options(policy: str, options: dict[str, Any], origin: str = "--policy-option") -> None:
    """Refuse unknown options and values of the wrong type or out of range, naming ``origin``."""
    try:
        policy_config(policy).resolve(None, options)
    except ConfigError as exc:
        raise ConfigError(f"{origin} {exc}") from None


def under_test_of(under_test: str | None, run: list[str], option: str = "--policies") -> str | None:
    """The policy the others are baselines for: ``--under-test`` when given (it must be among those ``run``),
    else fairbatching when it runs (else none: every policy is a baseline)."""
    if under_test is None:
        return "fairbatching" if "fairbatching" in run else None
    policy_names(under_test)
    if under_test not in run:
        raise ConfigError(f"--under-test {under_test!r} is not among {option} ({', '.join(run)}): it would not run")
    return under_test


def policy_names(policies: str) -> list[str]:
    """A comma-separated list of known policy names, e.g. ``--policies fairbatching,vllm``."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICY_CONFIGS]
    if unknown or not names:
        names = ", ".join(map(repr, unknown)) or "(none)"
        raise ConfigError(f"unknown policy {names}; choose from {', '.join(POLICY_CONFIGS)}")
    return names


def parse_policy_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``policy.key=value`` pairs; values are read as JSON where they parse (numbers, true, null), else text."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        policy, dot, key = head.partition(".")
        if not (eq and dot and key) or policy not in POLICY_CONFIGS:
            raise ConfigError(f"--policy-option takes policy.key=value with a policy of {', '.join(POLICY_CONFIGS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(policy, {})[key] = value
    for policy, options in out.items():
        check_policy_options(policy, options)
    return out


# --- output folders: checked before the run, written under a temporary name and renamed when complete


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Fail now, not after the simulation, if ``path`` cannot become a folder we can write into."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a folder")
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"{option} {path}: {probe_in} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".fairbatching-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {probe_in}: {exc.strerror}") from None


@contextlib.contextmanager
def staged_dir(out: Path, option: str = "--out") -> Iterator[Path]:
    """A temporary folder beside ``out``; its files move into ``out`` only when the block completes.

    An interrupted or failed write leaves ``out`` as it was (no half-written report next to old ones, and no
    ``out`` where there was none).
    """
    check_output_dir(out, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for item in sorted(tmp.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same folder, renamed over it. The folder is
    made if missing (``check_output_dir`` has vetted it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
