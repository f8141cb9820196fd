"""GPU time of a piece of work, from CUDA events: what the engine's warm-up and the benchmarks measure with."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_time(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median GPU time of ``fn`` in seconds (CUDA events), after one untimed warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)
