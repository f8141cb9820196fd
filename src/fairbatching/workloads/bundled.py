"""Traces shipped with the package (see data/NOTICE for sources and licenses), addressed by short names.

A bundled name (``azure-conv``) works wherever a trace path does, from any directory, so the examples and
the evaluation run on a fresh install. A file that exists under that name still wins: a path is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from fairbatching.workloads.spec import Workload

DATA = Path(str(files("fairbatching.workloads") / "data"))
NOTICE = DATA / "NOTICE"


@dataclass(frozen=True)
class BundledTrace:
    name: str
    file: str
    source: str
    license: str

    @property
    def path(self) -> Path:
        return DATA / self.file


_AZURE = "Azure LLM inference trace 2023 (Splitwise, ISCA 2024)"
_MOONCAKE = "Mooncake FAST25 release, hash_ids kept (compact)"

BUNDLED: dict[str, BundledTrace] = {
    t.name: t
    for t in (
        BundledTrace("azure-code", "AzureLLMInferenceTrace_code.csv.gz", f"{_AZURE}, code service", "CC-BY-4.0"),
        BundledTrace("azure-conv", "AzureLLMInferenceTrace_conv.csv.gz", f"{_AZURE}, conversation", "CC-BY-4.0"),
        BundledTrace("mooncake-conv", "mooncake_conversation_trace.jsonl.gz", f"{_MOONCAKE}; conv", "Apache-2.0"),
        BundledTrace("mooncake-synthetic", "mooncake_synthetic_trace.jsonl.gz", f"{_MOONCAKE}; synth", "Apache-2.0"),
    )
}


def bundled_name(path: Path) -> str | None:
    """The bundled name of a resolved trace path, if it is one of ours."""
    return next((t.name for t in BUNDLED.values() if t.path == path), None)


def resolve_trace(trace: str | Path) -> Path:
    """The file behind a trace argument: an existing path as given, else the bundled trace of that name."""
    path = Path(trace)
    if not path.is_file() and str(trace) in BUNDLED:
        return BUNDLED[str(trace)].path
    return path


def bundled_shapes() -> list[dict]:
    """Every bundled trace with its provenance and shape (loading all four takes well under a second)."""
    from fairbatching.workloads.traces import load_trace

    return [
        {"name": t.name, "source": t.source, "license": t.license, **trace_shape(load_trace(t.path))}
        for t in BUNDLED.values()
    ]


def trace_shape(workload: Workload) -> dict[str, float]:
    """What a person checks before replaying a trace: size, span, rate, and the spread of lengths."""
    prompts = np.array([r.prompt_len for r in workload.requests])
    outputs = np.array([r.output_len for r in workload.requests])
    shape: dict[str, float] = {
        "requests": len(workload),
        "duration_s": workload.duration,
        "qps": workload.qps,
    }
    for label, values in (("prompt", prompts), ("output", outputs)):
        for q in (50, 90, 99):
            shape[f"{label}_p{q}"] = float(np.percentile(values, q))
    return shape
