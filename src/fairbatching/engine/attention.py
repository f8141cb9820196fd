"""Attention over a paged KV cache for one iteration's packed tokens: decodes first, then prefill chunks.

Two backends share one metadata object, built once per iteration:
- ``reference`` (CPU, and the yardstick on GPU): per sequence, gather its K/V from its blocks and run SDPA
  with a bottom-right causal mask (a chunk sees all earlier context and itself).
- ``cuda``: decodes read K/V straight from the blocks with a Triton split-K kernel; prefill chunks gather
  their context and run FlashAttention-2 varlen over all chunks at once (causal = window (-1, 0),
  bottom-right aligned) or SDPA on cuDNN's fused attention, one call per chunk. ``prefill_impl`` picks:
  ``varlen`` or ``cudnn`` for every chunk, or ``auto``: cuDNN for fresh chunks (no prior context) of at least
  ``CUDNN_MIN_TOKENS``, varlen for the rest (measured on an H100, benchmarks/engine_kernels.py: cuDNN runs
  an 8k fresh chunk 1.9x faster than FlashAttention-2 but a chunk over earlier context 5-20% slower, and
  one call per chunk costs host time that only long chunks repay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbatching.errors import ConfigError

PREFILL_IMPLS = ("auto", "varlen", "cudnn")
CUDNN_MIN_TOKENS = 1024
# cuDNN builds an execution plan for every new sequence length, which costs more than the attention it saves
# (measured: prefill-carrying serving steps 25-33% slower than profiled). Fresh chunks are padded up to a
# multiple of this, so a few dozen plans, built at warm-up, cover every length; causality keeps the padding
# keys out of every real row.
CUDNN_PAD = 256


def check_prefill_impl(prefill_impl: str) -> None:
    if prefill_impl not in PREFILL_IMPLS:
        raise ConfigError(f"prefill attention must be one of {', '.join(PREFILL_IMPLS)}, got {prefill_impl!r}")


def prefers_cudnn(cached: int, new: int, prefill_impl: str) -> bool:
    """Whether a prefill chunk goes to cuDNN (the rest share one varlen call)."""
    if prefill_impl == "auto":
        return cached == 0 and new >= CUDNN_MIN_TOKENS
    return prefill_impl == "cudnn"


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
    varlen_q: int = 0  # query rows and context rows of the varlen group
    varlen_k: int = 0
    prefill_context_slots: torch.Tensor | None = None  # every context slot of every chunk, packed
    # chunks after the varlen group, one cuDNN call each: q start, q end, k start, k end in the prefill part,
    # and whether the chunk is fresh and padded (its context rows run to ``k end``, past its new tokens)
    cudnn_spans: list[tuple[int, int, int, int, bool]] | None = None
    # reference backend: per sequence (query start, query end, its context slots)
    sequences: list[tuple[int, int, torch.Tensor]] | None = None


def build_metadata(
    backend: str,
    chunks: list[tuple[int, int, list[int]]],
    num_decodes: int,
    block_size: int,
    device: torch.device,
    max_blocks: int | None = None,
    prefill_impl: str = "varlen",
) -> AttentionMetadata:
    """``chunks``: (tokens already cached, new tokens, block ids) per sequence, decodes first."""
    check_prefill_impl(prefill_impl)
    bs = block_size
    slots: list[int] = []
    context_slots: list[torch.Tensor] = []
    to_cudnn: list[bool] = []  # per prefill chunk
    padded: list[bool] = []
    for i, (cached, new, blocks) in enumerate(chunks):
        if i < num_decodes and backend != "reference":
            slots.append(blocks[cached // bs] * bs + cached % bs)  # a decode only writes; the kernel reads blocks
            continue
        pos = torch.arange(cached + new)
        ctx = torch.tensor(blocks, dtype=torch.int64)[pos // bs] * bs + pos % bs
        slots.extend(ctx[cached:].tolist())
        to_cudnn.append(backend != "reference" and prefers_cudnn(cached, new, prefill_impl))
        pad = to_cudnn[-1] and cached == 0
        padded.append(pad)
        if pad and new % CUDNN_PAD:  # slot 0 (the runner's scratch block) holds finite values
            ctx = torch.cat([ctx, torch.zeros(CUDNN_PAD - new % CUDNN_PAD, dtype=torch.int64)])
        context_slots.append(ctx)

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
        # The leading chunks that do not go to cuDNN share one varlen call; every chunk from the first cuDNN
        # one on gets its own call (the runner orders chunks so that the varlen ones lead).
        split = to_cudnn.index(True) if True in to_cudnn else len(prefills)
        cu_q = _cumsum([n for _c, n, _b in prefills])
        cu_k = _cumsum([len(ctx) for ctx in context_slots])
        if split:
            meta.cu_q = tensor(cu_q[: split + 1], torch.int32)
            meta.cu_k = tensor(cu_k[: split + 1], torch.int32)
            meta.max_q = max(n for _c, n, _b in prefills[:split])
            meta.max_k = max(c + n for c, n, _b in prefills[:split])
            meta.varlen_q, meta.varlen_k = cu_q[split], cu_k[split]
        if split < len(prefills):
            meta.cudnn_spans = list(
                zip(cu_q[split:-1], cu_q[split + 1 :], cu_k[split:-1], cu_k[split + 1 :], padded[split:], strict=True)
            )
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
    if meta.prefill_context_slots is not None:
        k = k_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        v = v_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        if meta.cu_q is not None:
            nq, nk = nd + meta.varlen_q, meta.varlen_k
            parts.append(
                varlen_attn(q[nd:nq], k[:nk], v[:nk], meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, window_size=(-1, 0))
            )
        if meta.cudnn_spans:
            parts.append(_cudnn_chunks(q[nd:], k, v, meta.cudnn_spans))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cudnn_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int, int, int, bool]]
) -> torch.Tensor:
    """One SDPA call per chunk on cuDNN's fused attention; a fresh chunk runs padded to its context rows, a
    chunk over earlier context gets a bottom-right causal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    first = spans[0][0]
    out = torch.empty_like(q[first:])
    scale = q.shape[-1] ** -0.5
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for qs, qe, ks, ke, padded in spans:
            n, total = qe - qs, ke - ks
            qi = F.pad(q[qs:qe], (0, 0, 0, 0, 0, total - n)) if padded else q[qs:qe]
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1)[None],
                k[ks:ke].transpose(0, 1)[None],
                v[ks:ke].transpose(0, 1)[None],
                attn_mask=None if padded or n == total else causal_lower_right(n, total),
                is_causal=padded or n == total,
                enable_gqa=True,
                scale=scale,
            )
            out[qs - first : qe - first] = o[0, :, :n].transpose(0, 1)
    return out


def warm_cudnn(num_heads: int, num_kv_heads: int, head_dim: int, max_tokens: int, dtype: torch.dtype) -> None:
    """Build cuDNN's plan for every padded fresh-chunk length up to ``max_tokens`` before serving."""
    for total in range(CUDNN_PAD * -(-CUDNN_MIN_TOKENS // CUDNN_PAD), max_tokens + 1, CUDNN_PAD):
        q = torch.zeros(total, num_heads, head_dim, device="cuda", dtype=dtype)
        kv = torch.zeros(total, num_kv_heads, head_dim, device="cuda", dtype=dtype)
        _cudnn_chunks(q, kv, kv, [(0, total, 0, total, True)])
