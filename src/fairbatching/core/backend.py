"""What executes a run's steps: the simulator (priced by the cost model) or GPU engines on the wall clock.

Torch-free, so a ``RunSpec`` can name a GPU run (and hash it into a cache key) on a machine without the
``[gpu]`` extra; ``engine.cluster`` builds what an ``EngineSpec`` describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Backend(StrEnum):
    """``sim``: the discrete-event simulator; ``gpu``: real-time replays on the GPU engine, one per GPU."""

    SIM = "sim"
    GPU = "gpu"


@dataclass(frozen=True)
class EngineSpec:
    """What each engine replica builds (``engine.build_engine`` arguments); ``device`` None picks CUDA if present.

    ``hardware`` (the GPU's name, or "cpu") builds nothing: it is there so that a GPU run's cache key differs
    between GPU models."""

    model: str
    max_context: int = 16384
    num_blocks: int | None = None
    kv_memory_fraction: float = 0.8
    device: str | None = None
    block_size: int = 16
    hardware: str = ""
