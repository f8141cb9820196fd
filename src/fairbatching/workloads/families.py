"""Workload families: one named source (a trace file or the synthetic generator) that yields a workload
for any load level and seed. For a trace, the seed picks which window of the trace is replayed, so
several seeds sample different stretches of real traffic at the same rate."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError
from fairbatching.workloads.bundled import BUNDLED, resolve_trace
from fairbatching.workloads.spec import Workload
from fairbatching.workloads.synthetic import (
    CONVERSATION_OUTPUTS,
    CONVERSATION_PROMPTS,
    conversation_workload,
    synthetic_workload,
)
from fairbatching.workloads.traces import load_trace


@dataclass(frozen=True)
class WorkloadFamily:
    name: str
    trace: str | None = None  # a bundled trace name (see `fairbatching traces`) or a path
    burstiness: float = 4.0  # synthetic families only
    slo_classes: tuple[tuple[float, SLO], ...] = ()  # synthetic families only: (weight, SLO) per tenant class
    multi_turn: bool = False  # the multi-turn conversation generator (turns share their history)

    def build(self, qps: float, seed: int, num_requests: int) -> Workload:
        if self.multi_turn:
            return conversation_workload(num_requests, qps, seed, self.name)
        if self.trace is None:
            return synthetic_workload(
                num_requests,
                qps,
                CONVERSATION_PROMPTS,
                CONVERSATION_OUTPUTS,
                self.burstiness,
                seed,
                self.name,
                self.slo_classes,
            )
        full = _load(str(self.path()))
        n = min(num_requests, len(full))
        start = 0 if seed == 0 or len(full) == n else int(np.random.default_rng(seed).integers(0, len(full) - n))
        w = full.head(n, start)
        return Workload(self.name, w.requests, {**w.meta, "start": start}).rescaled(qps)

    def path(self) -> Path:
        return resolve_trace(self.trace)

    def available(self) -> bool:
        return self.trace is None or self.path().is_file()

    def fingerprint(self) -> str | None:
        """Hash of the trace file's content (None for synthetic families): cache keys carry it, so a trace
        edited in place is simulated again instead of reporting the old file's numbers."""
        if self.trace is None:
            return None
        path = self.path()
        try:
            st = path.stat()
        except OSError:
            return None  # missing: the run itself reports it
        return _file_hash(str(path.resolve()), st.st_mtime_ns, st.st_size)

    def check(self, num_requests: int | None = None) -> None:
        """Load the trace now, so a bad file fails with its own message before any worker starts; a window of
        ``num_requests`` must fit in it (a shorter one would be measured as if it were the window asked for)."""
        if self.trace is not None:
            full = _load(str(self.path()))
            if num_requests is not None and num_requests > len(full):
                raise ConfigError(
                    f"-n {num_requests}: workload {self.name!r} ({self.path()}) has only {len(full)} requests"
                )


def _load(path: str) -> Workload:
    """The trace, parsed once per version of the file (a trace edited in place is read again)."""
    try:
        st = Path(path).stat()
    except OSError:
        return load_trace(path)  # missing or unreadable: load_trace says which
    return _load_version(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load_version(path: str, mtime_ns: int, size: int) -> Workload:
    return load_trace(path)


@lru_cache(maxsize=64)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file, remembered per (path, modification time, size) so sweeps hash each file once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


FAMILIES: dict[str, WorkloadFamily] = {
    f.name: f
    for f in (
        WorkloadFamily("default"),
        # Two tenants on one node: interactive (0.5 s / 50 ms) and relaxed (8 s / 200 ms), half each.
        WorkloadFamily("mixed-slo", slo_classes=((1.0, SLO(0.5, 0.05)), (1.0, SLO(8.0, 0.2)))),
        # Multi-turn chat whose turns share their history: what prefix caching is for.
        WorkloadFamily("multi-turn", multi_turn=True),
        *(WorkloadFamily(name, name) for name in BUNDLED),
    )
}


def family(name: str) -> WorkloadFamily:
    """A built-in family by name, or a trace file path as its own family."""
    if name in FAMILIES:
        return FAMILIES[name]
    if Path(name).is_file():
        return WorkloadFamily(Path(name).stem, str(Path(name).resolve()))
    raise ConfigError(f"unknown workload {name!r}: not a file, and not one of {', '.join(FAMILIES)}")


def generated_family(name: str) -> WorkloadFamily:
    """A family that generates its requests rather than reading a trace (``--workload``; traces go by
    ``--trace``)."""
    generated = [n for n, f in FAMILIES.items() if f.trace is None and n != "default"]
    if name not in generated:
        raise ConfigError(
            f"--workload {name!r}: not one of {', '.join(generated)} (trace files and bundled traces go by --trace)"
        )
    return FAMILIES[name]
