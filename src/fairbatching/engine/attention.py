"""Attention over a paged KV cache for one iteration's packed tokens: decodes first, then prefill chunks.

Two backends share one metadata object, built once per iteration:
- ``reference`` (CPU, and the yardstick on GPU): per sequence, gather its K/V from its blocks and run SDPA
  with a bottom-right causal mask (a chunk sees all earlier context and itself).
- ``cuda``: decodes read K/V straight from the blocks with a Triton split-K kernel; prefill chunks gather
  their context and run FlashAttention varlen (causal = window (-1, 0), bottom-right aligned).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence reads.

    Tokens are packed as ``num_decodes`` single-token decodes, then the prefill chunks. ``slots`` are flat
    cache indices (block * block_size + offset) of the new tokens.
    """

    backend: str
    slots: torch.Tensor
    num_decodes: int
    block_size: int
    # decodes
    block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, including the new token
    num_splits: int = 1
    # prefill chunks
    cu_q: torch.Tensor | None = None  # [P + 1] int32, offsets into the prefill part
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    prefill_context_slots: torch.Tensor | None = None  # every context slot of every chunk, packed
    # reference backend: per sequence (query start, query end, its context slots)
    sequences: list[tuple[int, int, torch.Tensor]] | None = None


def build_metadata(
    backend: str,
    chunks: list[tuple[int, int, list[int]]],
    num_decodes: int,
    block_size: int,
    device: torch.device,
    max_blocks: int | None = None,
) -> AttentionMetadata:
    """``chunks``: (tokens already cached, new tokens, block ids) per sequence, decodes first."""
    bs = block_size
    slots: list[int] = []
    context_slots: list[torch.Tensor] = []
    for i, (cached, new, blocks) in enumerate(chunks):
        if i < num_decodes and backend != "reference":
            slots.append(blocks[cached // bs] * bs + cached % bs)  # a decode only writes; the kernel reads blocks
            continue
        pos = torch.arange(cached + new)
        ctx = torch.tensor(blocks, dtype=torch.int64)[pos // bs] * bs + pos % bs
        context_slots.append(ctx)
        slots.extend(ctx[cached:].tolist())

    def tensor(values, dtype=torch.int64):
        return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)

    meta = AttentionMetadata(backend, tensor(slots), num_decodes, block_size)
    if backend == "reference":
        seqs, start = [], 0
        for (_cached, new, _blocks), ctx in zip(chunks, context_slots, strict=True):
            seqs.append((start, start + new, ctx.to(device)))
            start += new
        meta.sequences = seqs
        return meta
    decodes, prefills = chunks[:num_decodes], chunks[num_decodes:]
    if decodes:
        width = max_blocks or max(len(b) for _c, _n, b in decodes)
        table = np.zeros((len(decodes), width), dtype=np.int32)
        for i, (_c, _n, blocks) in enumerate(decodes):
            table[i, : len(blocks)] = blocks
        meta.block_tables = tensor(table, torch.int32)
        lens = [c + n for c, n, _b in decodes]
        meta.context_lens = tensor(lens, torch.int32)
        meta.num_splits = decode_splits(len(decodes), max(lens))
    if prefills:
        q_lens = [n for _c, n, _b in prefills]
        k_lens = [c + n for c, n, _b in prefills]
        meta.cu_q = tensor(_cumsum(q_lens), torch.int32)
        meta.cu_k = tensor(_cumsum(k_lens), torch.int32)
        meta.max_q, meta.max_k = max(q_lens), max(k_lens)
        meta.prefill_context_slots = torch.cat(context_slots).to(device, non_blocking=True)
    return meta


def decode_splits(num_decodes: int, max_context: int, target_programs: int = 1024) -> int:
    """Split long contexts across programs when there are too few sequences to fill the GPU."""
    return max(1, min(16, target_programs // max(1, num_decodes * 8), max_context // 256))


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [tokens, heads, dim]; caches: [blocks, block_size, kv_heads, dim]. Returns [tokens, heads, dim]."""
    if meta.backend == "reference":
        return _reference(q, k_cache, v_cache, meta)
    return _cuda(q, k_cache, v_cache, meta)


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    nh, d = q.shape[1], q.shape[2]
    nkv = k_cache.shape[2]
    k_flat, v_flat = k_cache.view(-1, nkv, d), v_cache.view(-1, nkv, d)
    out = torch.empty_like(q)
    for start, end, ctx in meta.sequences:
        n, total = end - start, ctx.shape[0]
        k = k_flat[ctx].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)
        v = v_flat[ctx].repeat_interleave(nh // nkv, dim=1).transpose(0, 1)
        rows = torch.arange(total - n, total, device=q.device)[:, None]
        mask = torch.arange(total, device=q.device)[None, :] <= rows
        a = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=d**-0.5)
        out[start:end] = a.transpose(0, 1)
    return out


def _cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    from fairbatching.engine.kernels import paged_decode_attention

    nd = meta.num_decodes
    d = q.shape[2]
    nkv = k_cache.shape[2]
    parts = []
    if nd:
        parts.append(
            paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables, meta.context_lens, meta.num_splits)
        )
    if meta.cu_q is not None:
        k = k_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        v = v_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        parts.append(varlen_attn(q[nd:], k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, window_size=(-1, 0)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
