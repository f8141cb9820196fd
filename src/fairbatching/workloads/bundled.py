"""Traces shipped with the package (see data/NOTICE for sources and licenses), addressed by short names.

A bundled name (``azure-conv``) works wherever a trace path does, from any directory, so the examples and
the evaluation run on a fresh install. A file that exists under that name still wins: a path is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

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
