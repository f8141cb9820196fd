"""Llama-family decoder over a packed batch of sequence chunks, reading and writing a paged KV cache.

Weights are plain tensors laid out for ``x @ W`` (Q/K/V and gate/up fused), random from a seed or loaded
from a local safetensors checkpoint with Hugging Face names. The forward pass takes every token of one
iteration (any mix of prefill chunks and decodes) and returns the greedy next token of the sequences
that sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fairbatching.engine.attention import AttentionMetadata, attention
from fairbatching.engine.config import ModelConfig
from fairbatching.errors import ConfigError


@dataclass
class LayerWeights:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = _load_checkpoint(Path(checkpoint), config) if checkpoint else None
        self._build(tensors, seed)
        self.inv_freq = _rope_inv_freq(config).to(self.device)

    def _build(self, tensors: dict[str, torch.Tensor] | None, seed: int) -> None:
        c = self.config
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def get(name: str, shape: tuple[int, ...], kind: str = "normal") -> torch.Tensor:
            if tensors is not None:
                t = tensors.get(name)
                if t is None:
                    raise ConfigError(f"checkpoint lacks tensor {name!r}")
                if tuple(t.shape) != shape:
                    raise ConfigError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, config says {shape}")
            elif kind == "ones":
                t = torch.ones(shape, device=self.device)
            elif kind == "zeros":
                t = torch.zeros(shape, device=self.device)
            else:  # drawn on the device: an 8B model's random weights in seconds, not minutes
                t = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype).mul_(0.02)
            return t.to(self.device, self.dtype)

        h, d, nh, nkv, ff = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
        self.embed = get("model.embed_tokens.weight", (c.vocab_size, h))
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = get(p + "self_attn.q_proj.weight", (nh * d, h))
            k = get(p + "self_attn.k_proj.weight", (nkv * d, h))
            v = get(p + "self_attn.v_proj.weight", (nkv * d, h))
            bias = None
            if c.attention_bias:
                bias = torch.cat(
                    [
                        get(p + "self_attn.q_proj.bias", (nh * d,), "zeros"),
                        get(p + "self_attn.k_proj.bias", (nkv * d,), "zeros"),
                        get(p + "self_attn.v_proj.bias", (nkv * d,), "zeros"),
                    ]
                )
            gate = get(p + "mlp.gate_proj.weight", (ff, h))
            up = get(p + "mlp.up_proj.weight", (ff, h))
            self.layers.append(
                LayerWeights(
                    qkv=torch.cat([q, k, v]).t().contiguous(),
                    qkv_bias=bias,
                    o=get(p + "self_attn.o_proj.weight", (h, nh * d)).t().contiguous(),
                    gate_up=torch.cat([gate, up]).t().contiguous(),
                    down=get(p + "mlp.down_proj.weight", (h, ff)).t().contiguous(),
                    input_norm=get(p + "input_layernorm.weight", (h,), "ones"),
                    post_attention_norm=get(p + "post_attention_layernorm.weight", (h,), "ones"),
                )
            )
            if tensors is not None:
                for key in [name for name in tensors if name.startswith(p)]:
                    del tensors[key]  # release the HF-layout copy as soon as the fused one exists
        self.final_norm = get("model.norm.weight", (h,), "ones")
        if c.tie_word_embeddings:
            self.lm_head = self.embed.t()
        else:
            self.lm_head = get("lm_head.weight", (c.vocab_size, h)).t().contiguous()

    def new_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """[layers, K/V, blocks, block_size, kv_heads, head_dim], vLLM's flash layout per layer."""
        c = self.config
        shape = (c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        sample_index: torch.Tensor,
    ) -> torch.Tensor:
        """Greedy next token at each ``sample_index`` (the last token of every sequence that samples)."""
        cos, sin = self.rope_tables(positions)
        x = self.embed[token_ids]
        q = self.pre_attention(0, x, cos, sin, kv_cache, meta.slots)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            a = attention(q, kv_cache[i, 0], kv_cache[i, 1], meta)
            x = self.post_attention(i, x, a)
            if i < last:
                q = self.pre_attention(i + 1, x, cos, sin, kv_cache, meta.slots)
        return self.sample(x, sample_index)

    # The pieces between attentions: the runner captures them in CUDA graphs for mixed batches.

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos().to(self.dtype)[:, None, :], freqs.sin().to(self.dtype)[:, None, :]

    def pre_attention(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``i``'s norm, QKV projection and RoPE; writes K/V into the cache, returns Q."""
        c, w = self.config, self.layers[i]
        t, nh, nkv, d = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = F.rms_norm(x, (c.hidden_size,), w.input_norm, c.rms_norm_eps) @ w.qkv
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        q = _rope(qkv[:, : nh * d].view(t, nh, d), cos, sin)
        k = _rope(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d), cos, sin)
        v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)
        kv_cache[i, 0].view(-1, nkv, d).index_copy_(0, slots, k)
        kv_cache[i, 1].view(-1, nkv, d).index_copy_(0, slots, v)
        return q

    def post_attention(self, i: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s output projection, residual, and SwiGLU MLP."""
        c, w = self.config, self.layers[i]
        ff = c.intermediate_size
        x = x + a.reshape(x.shape[0], -1) @ w.o
        gu = F.rms_norm(x, (c.hidden_size,), w.post_attention_norm, c.rms_norm_eps) @ w.gate_up
        return x + (F.silu(gu[:, :ff]) * gu[:, ff:]) @ w.down

    def sample(self, x: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        c = self.config
        last = F.rms_norm(x[sample_index], (c.hidden_size,), self.final_norm, c.rms_norm_eps)
        return (last @ self.lm_head).argmax(-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, as Hugging Face's Llama applies it."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies computed as transformers does (float32), with Llama 3.1's scaling if asked."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_llama3_scaling is None:
        return inv
    factor, low, high, original = config.rope_llama3_scaling
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)


def _load_checkpoint(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of a local safetensors checkpoint (one file or shards); never downloads."""
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConfigError(
            "loading a checkpoint needs the 'safetensors' package (pip install 'fairbatching[gpu]')"
        ) from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files (the engine loads local safetensors checkpoints only)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors
