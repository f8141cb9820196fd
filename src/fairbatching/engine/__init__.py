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

from fairbatching.engine.config import PRESETS, ModelConfig, check_engine_sizes, model_config
from fairbatching.engine.model import LlamaModel
from fairbatching.engine.runner import ModelRunner

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# What the KV sizing leaves free beyond what warm-up and the largest step were measured to take: a share of that
# (other step shapes, allocator fragmentation) plus a fixed slack (the CUDA context growing, library workspaces).
WARMUP_SLACK = 0.10
HEADROOM_BYTES = 1 << 30
MAX_STEP_TOKENS = 8192  # the policies' default max_num_batched_tokens: the largest step a replay runs


def kv_cache_blocks(free_bytes: int, warmup_bytes: int, block_bytes: int, kv_memory_fraction: float) -> int:
    """KV blocks for ``free_bytes`` of GPU memory (free after the weights): what is left once warm-up and the
    largest step have what they were measured to need (``warmup_bytes``, plus ``WARMUP_SLACK`` of it and
    ``HEADROOM_BYTES``), and at most ``kv_memory_fraction`` of ``free_bytes``. A fixed fraction alone ran out
    of memory during warm-up on an H200 at 0.9 (CUDA graphs of every mixed-step size keep their buffers)."""
    if not 0 < kv_memory_fraction <= 1:
        raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
    left = free_bytes - warmup_bytes * (1 + WARMUP_SLACK) - HEADROOM_BYTES
    blocks = int(min(left, free_bytes * kv_memory_fraction) // block_bytes)
    if blocks < 2:
        raise ConfigError(
            f"no GPU memory left for the KV cache: {free_bytes / 2**30:.1f} GiB free after the weights, warm-up and "
            f"the largest step need {warmup_bytes / 2**30:.1f} GiB"
        )
    return blocks


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
    warmup: bool = True,
) -> ModelRunner:
    """A runner for a preset or a checkpoint directory, warmed (kernels compiled, graphs captured) unless
    ``warmup`` is False. On CUDA without ``num_blocks`` the KV cache is sized after warm-up was measured:
    the engine warms on a small cache, runs its largest step, and the cache then takes what that left free
    (``kv_cache_blocks``), at most ``kv_memory_fraction`` of the memory free after the weights."""
    check_engine_sizes(num_blocks, block_size, max_context)
    config = model_config(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but PyTorch sees no CUDA GPU")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if num_blocks is None and not device.startswith("cuda"):
        raise ConfigError("give num_blocks for a CPU engine")
    checkpoint = model if Path(model).is_dir() else None
    llama = LlamaModel(config, device, DTYPES[dtype], checkpoint=checkpoint, seed=seed)
    step_tokens = min(MAX_STEP_TOKENS, max_context)
    probe = num_blocks is None
    if probe:
        free, _total = torch.cuda.mem_get_info(llama.device)
        # A small cache for warm-up: the largest step's prompt, and a scratch block.
        num_blocks = -(-step_tokens // block_size) + 1
    runner = ModelRunner(
        llama, num_blocks, block_size, max_context, cuda_graphs=cuda_graphs, prefill_attention=prefill_attention
    )
    if probe:
        block_bytes = runner.kv_cache[:, :, :1].numel() * runner.kv_cache.element_size()
        runner.warmup()
        _largest_step(runner, step_tokens)
        torch.cuda.synchronize()
        used = free - torch.cuda.mem_get_info(llama.device)[0] - num_blocks * block_bytes
        runner.resize_kv(kv_cache_blocks(free, used, block_bytes, kv_memory_fraction))
        runner.warmup_bytes = used
    if warmup:
        runner.warmup()
    return runner


def _largest_step(runner: ModelRunner, tokens: int) -> None:
    """One prefill of ``tokens`` (the largest step a policy plans), so its activations count as needed."""
    from fairbatching.engine.runner import SeqChunk

    blocks = runner.pool.take(-(-tokens // runner.block_size))
    try:
        runner.run([SeqChunk([0] * tokens, 0, blocks, sample=True)])
    finally:
        runner.pool.give_back(blocks)


__all__ = ["PRESETS", "LlamaModel", "ModelConfig", "ModelRunner", "build_engine", "model_config"]
