"""Which token counts mixed-step CUDA graphs are captured at, chosen by measuring the matmuls.

A mixed step runs padded up to the next captured size, so each size should be one where the step's linear
layers run faster than at every larger size. cuBLAS does not guarantee that: on an H100 with Llama-3-8B
shapes some sizes ran slower than larger ones (results/gpu-engine/README.md, ``step_sizes``). Padding to
such a size costs more than padding past it, and makes step time jump where a cost model linear in tokens
expects a smooth line. The engine therefore times one layer's
matmuls at every candidate size at warm-up and keeps only the sizes that save time over the next one kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fairbatching.engine.model import LayerWeights
from fairbatching.engine.timing import cuda_time
from fairbatching.errors import ConfigError

# Finer steps than powers of two: coarse buckets pad a mixed step far past its tokens, and padded steps run
# over what a cost model linear in tokens predicts (measured: results/gpu-engine/README.md, coarse-buckets).
CANDIDATE_TOKEN_SIZES = (*range(32, 257, 32), *range(320, 1025, 64), *range(1152, 2049, 128))
MIN_SAVING = 0.03  # a smaller size is kept only if it saves at least this share over the next larger one


def efficient_sizes(times: Mapping[int, float], min_saving: float = MIN_SAVING) -> tuple[int, ...]:
    """The sizes worth padding to: walking down from the largest (always kept), a size is kept when its time
    is at least ``min_saving`` below that of the last size kept. Step time then grows with every kept size."""
    if not times:
        raise ConfigError("no graph sizes to choose from")
    if not 0 <= min_saving < 1:
        raise ConfigError(f"min_saving must be in [0, 1), got {min_saving}")
    sizes = sorted(times, reverse=True)
    kept = [sizes[0]]
    for size in sizes[1:]:
        if times[size] <= (1 - min_saving) * times[kept[-1]]:
            kept.append(size)
    return tuple(sorted(kept))


def linear_layer_times(layer: LayerWeights, sizes: Iterable[int], repeats: int = 20) -> dict[int, float]:
    """Median GPU seconds of one layer's matmuls (QKV, output, gate/up, down) at each token count."""
    weights = (layer.qkv, layer.o, layer.gate_up, layer.down)
    times = {}
    for n in sizes:
        inputs = [torch.randn(n, w.shape[0], device=w.device, dtype=w.dtype) for w in weights]

        def run(inputs=inputs):
            for x, w in zip(inputs, weights, strict=True):
                x @ w

        times[n] = cuda_time(run, repeats)
    return times
