"""Triton paged decode attention: one query token per sequence, K/V read straight from its cache blocks.

Grid (sequence, KV head, split): every program serves the query heads that share one KV head (GQA), so
each K/V tile is read once for the whole group, and walks its share of the context with an online
softmax. Splits (flash-decoding) keep the GPU busy when there are few sequences; a cheap log-sum-exp merge
combines them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    lse_ptr,
    scale,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ts,
    stride_os,
    stride_oh,
    stride_ls,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), TILE) * TILE
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    group_mask = g < GROUP
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=group_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    den = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offs = tl.arange(0, TILE)
    for off in range(start, end, TILE):
        pos = off + offs
        valid = pos < end
        block = tl.load(tables_ptr + seq * stride_ts + pos // BLOCK_SIZE, mask=valid, other=0)
        row = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    safe = tl.where(den > 0, den, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(den > 0, m + tl.log(safe), float("-inf"))
    o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + split * HEAD_DIM + d[None, :]
    tl.store(o_ptrs, out, mask=group_mask[:, None])
    tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=group_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_splits: int,
    tile: int = 64,
) -> torch.Tensor:
    """q: [seqs, heads, dim]; caches [blocks, block_size, kv_heads, dim]; returns [seqs, heads, dim]."""
    s, nh, d = q.shape
    _, block_size, nkv, _ = k_cache.shape
    group = nh // nkv
    out = torch.empty(s, nh, num_splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(s, nh, num_splits, device=q.device, dtype=torch.float32)
    _paged_decode[(s, nkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        lse,
        d**-0.5,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        TILE=tile,
        NUM_SPLITS=num_splits,
        num_warps=4,
    )
    if num_splits == 1:
        return out[:, :, 0].to(q.dtype)
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)
    return (out * weights).sum(dim=2).to(q.dtype)
