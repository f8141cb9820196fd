"""Llama-family decoder over a packed batch of sequence chunks, reading and writing a paged KV cache.

Weights are plain tensors laid out for ``x @ W`` (Q/K/V and gate/up fused), random from a seed or loaded
from a local safetensors checkpoint with Hugging Face names. The forward pass takes every token of one
iteration (any mix of prefill chunks and decodes) and returns the greedy next token of the sequences
that sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from fairbatching.engine.attention import AttentionMetadata, attention
from fairbatching.engine.config import ModelConfig
from fairbatching.errors import ConfigError, install_hint


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
        fused_kernels: bool | None = None,
    ) -> None:
        """``fused_kernels``: run the Triton kernels of ``fused.py`` (default: on CUDA)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = _load_checkpoint(Path(checkpoint), config) if checkpoint else None
        self._build(tensors, seed)
        self.inv_freq = _rope_inv_freq(config).to(self.device)
        half = config.head_dim // 2
        pow2 = half & (half - 1) == 0
        if fused_kernels is None:
            fused_kernels = self.device.type == "cuda" and pow2
        elif fused_kernels and not pow2:
            raise ConfigError(f"the fused RoPE kernel needs head_dim / 2 a power of two, got {config.head_dim}")
        self.kernels: ModuleType | None = None
        if fused_kernels:
            from fairbatching.engine import fused

            self.kernels = fused

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

        h = c.hidden_size
        self.embed = get("model.embed_tokens.weight", (c.vocab_size, h))
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(self._layer(get, p))
            if tensors is not None:
                for key in [name for name in tensors if name.startswith(p)]:
                    del tensors[key]  # release the HF-layout copy as soon as the fused one exists
        self.final_norm = get("model.norm.weight", (h,), "ones")
        if c.tie_word_embeddings:
            self.lm_head = self.embed.t()
        else:
            self.lm_head = get("lm_head.weight", (c.vocab_size, h)).t().contiguous()

    def _layer(self, get: Callable[..., torch.Tensor], p: str) -> LayerWeights:
        """Layer ``p``'s weights in the fused layout, drawn (or read) in the order ``_build`` always has."""
        c = self.config
        h, d, nh, nkv, ff = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
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
        return LayerWeights(
            qkv=torch.cat([q, k, v]).t().contiguous(),
            qkv_bias=bias,
            o=get(p + "self_attn.o_proj.weight", (h, nh * d)).t().contiguous(),
            gate_up=torch.cat([gate, up]).t().contiguous(),
            down=get(p + "mlp.down_proj.weight", (h, ff)).t().contiguous(),
            input_norm=get(p + "input_layernorm.weight", (h,), "ones"),
            post_attention_norm=get(p + "post_attention_layernorm.weight", (h,), "ones"),
        )

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
        return self.sample(*self.hidden(token_ids, positions, kv_cache, meta), sample_index)

    @torch.inference_mode()
    def hidden(
        self, token_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output and the residual stream of every token (before the final norm)."""
        cos, sin = self.rope_tables(positions)
        q, residual = self.pre_attention(0, self.embed[token_ids], None, cos, sin, kv_cache, meta.slots)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            a = attention(q, kv_cache[i, 0], kv_cache[i, 1], meta)
            h, residual = self.post_attention(i, a, residual)
            if i < last:
                q, residual = self.pre_attention(i + 1, h, residual, cos, sin, kv_cache, meta.slots)
        return h, residual

    # The pieces between attentions: the runner captures them in CUDA graphs for mixed batches. As in vLLM,
    # a sublayer's output ``h`` and the residual stream travel apart, so that adding them fuses with the
    # next norm.

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos().to(self.dtype)[:, None, :], freqs.sin().to(self.dtype)[:, None, :]

    def pre_attention(
        self,
        i: int,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s residual add, norm, QKV projection and RoPE; writes K/V into the cache.

        ``h`` is the previous layer's MLP output (the embeddings, with ``residual`` None, for layer 0).
        Returns Q and the residual stream."""
        c, w = self.config, self.layers[i]
        t, nh, nkv, d = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        normed, residual = self._add_norm(h, residual, w.input_norm)
        qkv = normed @ w.qkv
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        if self.kernels is not None:
            return self.kernels.rope_write_kv(qkv, cos, sin, kv_cache[i, 0], kv_cache[i, 1], slots, nh, nkv), residual
        q = _rope(qkv[:, : nh * d].view(t, nh, d), cos, sin)
        k = _rope(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d), cos, sin)
        v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)
        kv_cache[i, 0].view(-1, nkv, d).index_copy_(0, slots, k)
        kv_cache[i, 1].view(-1, nkv, d).index_copy_(0, slots, v)
        return q, residual

    def post_attention(self, i: int, a: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s output projection, residual add, norm and SwiGLU MLP; returns (MLP output, residual)."""
        c, w = self.config, self.layers[i]
        normed, residual = self._add_norm(a.reshape(a.shape[0], -1) @ w.o, residual, w.post_attention_norm)
        gu = normed @ w.gate_up
        ff = c.intermediate_size
        act = self.kernels.silu_mul(gu) if self.kernels is not None else F.silu(gu[:, :ff]) * gu[:, ff:]
        return act @ w.down, residual

    def sample(self, h: torch.Tensor, residual: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = h[sample_index] + residual[sample_index]
        return (F.rms_norm(x, (c.hidden_size,), self.final_norm, c.rms_norm_eps) @ self.lm_head).argmax(-1)

    def _add_norm(
        self, h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.config.rms_norm_eps
        if residual is None:
            residual = h
        elif self.kernels is not None:
            return self.kernels.add_rms_norm(h, residual, weight, eps)
        else:
            residual = residual + h
        return F.rms_norm(residual, (self.config.hidden_size,), weight, eps), residual


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
        raise ConfigError(f"loading a checkpoint needs the 'safetensors' package ({install_hint('gpu')})") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files (the engine loads local safetensors checkpoints only)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors
