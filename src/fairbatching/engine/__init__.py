"""GPU serving engine (optional extra ``[gpu]``: torch): a Llama-family model over a paged KV cache, run by
the same policy objects and ``serving.Node`` step loop as the simulator.

- ``config``: model architecture (presets, or a local HF checkpoint's config.json)
- ``model``: weights and the forward pass over one iteration's packed chunks
- ``attention`` / ``kernels``: paged attention (SDPA reference; Triton decode + FlashAttention varlen
  or cuDNN prefill on CUDA); ``fused``: Triton kernels for RoPE/KV write, add+RMSNorm, SwiGLU
- ``runner``: one iteration (CUDA graphs for decode-only batches), physical KV blocks
- ``loop``: offline ``generate`` and wall-clock trace ``replay``
- ``profiler``: measured rows for the cost model; ``timing``: GPU time from CUDA events
- ``graph_sizes``: the token counts mixed-step graphs are captured at, from timed matmuls
"""

from __future__ import annotations

from pathlib import Path

from fairbatching.errors import ConfigError, install_hint

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError(f"the GPU engine needs PyTorch: {install_hint('gpu')}") from exc

from fairbatching.engine.config import PRESETS, ModelConfig, model_config
from fairbatching.engine.model import LlamaModel
from fairbatching.engine.runner import ModelRunner

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_engine(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    num_blocks: int | None = None,
    block_size: int = 16,
    max_context: int = 16384,
    kv_memory_fraction: float = 0.9,
    seed: int = 0,
    cuda_graphs: bool = True,
    prefill_attention: str = "auto",
) -> ModelRunner:
    """A runner for a preset or a checkpoint directory; on CUDA the KV cache takes ``kv_memory_fraction``
    of the memory left after the weights (like vLLM's gpu_memory_utilization), unless ``num_blocks`` says."""
    config = model_config(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but PyTorch sees no CUDA GPU")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    checkpoint = model if Path(model).is_dir() else None
    llama = LlamaModel(config, device, DTYPES[dtype], checkpoint=checkpoint, seed=seed)
    if num_blocks is None:
        if not device.startswith("cuda"):
            raise ConfigError("give num_blocks for a CPU engine")
        free, _total = torch.cuda.mem_get_info()
        per_block = (
            block_size * config.num_layers * 2 * config.num_kv_heads * config.head_dim * llama.embed.element_size()
        )
        num_blocks = int(free * kv_memory_fraction // per_block)
    return ModelRunner(
        llama, num_blocks, block_size, max_context, cuda_graphs=cuda_graphs, prefill_attention=prefill_attention
    )


__all__ = ["PRESETS", "LlamaModel", "ModelConfig", "ModelRunner", "build_engine", "model_config"]
