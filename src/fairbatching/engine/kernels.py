"""Triton paged attention: query tokens read their K/V straight from the sequence's cache blocks.

One kernel, launched twice into one output, serves decodes (one query token per sequence) and prefill
chunks (fresh or over earlier context). Grid (query tile, KV head, split): every program serves the query
heads that share one KV head (GQA), for ``BLOCK_Q`` consecutive tokens of one sequence, so each K/V tile is
read once for the whole group; it walks its share of the context with an online softmax and a causal mask.
Splits (flash-decoding) keep the GPU busy when there are few tiles over long contexts, which is where
FlashAttention-2 varlen stalls: it runs one program per 128 queries and head, so a 32-token chunk over 4k
tokens of context occupies 32 of 132 SMs, each walking all 4k keys. A cheap log-sum-exp merge combines the
splits.

Launch shapes depend only on the lengths of ``lens`` and ``tiles``, not on their contents: a decode row with
length 0 and a tile of 0 rows store nothing, so a CUDA graph captured for a padded token count serves any
mix of decodes and chunks that fits it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    tiles_ptr,
    out_ptr,
    lse_ptr,
    scale,
    num_splits,
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
    BLOCK_Q: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if BLOCK_Q == 1:  # a decode: tile i is sequence i's single (last) token
        seq = tile
        row0 = tile
        n_rows = 1
        pos0 = tl.load(lens_ptr + seq) - 1
    else:  # a tile of a chunk: its sequence, first query row, rows, and the position of its first token
        seq = tl.load(tiles_ptr + tile * 4)
        row0 = tl.load(tiles_ptr + tile * 4 + 1)
        n_rows = tl.load(tiles_ptr + tile * 4 + 2)
        pos0 = tl.load(tiles_ptr + tile * 4 + 3)
    kv_end = pos0 + n_rows  # 0 for a decode row of length 0 and for a tile of 0 rows: nothing to do
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), TILE) * TILE
    start = split * per_split
    end = tl.minimum(start + per_split, kv_end)

    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = r // GROUP_PAD
    g = r % GROUP_PAD
    heads = kv_head * GROUP + g
    row_ok = (tok < n_rows) & (g < GROUP) & (tok < kv_end)  # a decode row of length 0: nothing
    q_pos = pos0 + tok
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (row0 + tok)[:, None].to(tl.int64) * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    offs = tl.arange(0, TILE)
    for off in range(start, end, TILE):
        pos = off + offs
        valid = pos < end
        block = tl.load(tables_ptr + seq * stride_ts + pos // BLOCK_SIZE, mask=valid, other=0)
        row = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        # a row whose keys in this split all lie after it (causality) keeps m = -inf; shift it by 0, not -inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - shift[:, None])
        alpha = tl.exp(m - shift)
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    safe = tl.where(den > 0, den, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(den > 0, m + tl.log(safe), float("-inf"))
    out_row = (row0 + tok).to(tl.int64)
    o_ptrs = out_ptr + out_row[:, None] * stride_os + heads[:, None] * stride_oh + split * HEAD_DIM + d[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None])
    tl.store(lse_ptr + out_row * stride_ls + heads * stride_lh + split, lse, mask=row_ok)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor | None,
    tiles: torch.Tensor | None,
    num_splits: int,
    block_q: int = 16,
    tile: int = 64,
) -> torch.Tensor:
    """Attention of ``q`` [tokens, heads, dim] over caches [blocks, block_size, kv_heads, dim]; returns
    [tokens, heads, dim].

    Decodes: query row i (i < len(lens)) is the last token of the sequence in table row i, ``lens[i]`` long
    (0: not a decode, skipped). Chunks: ``tiles`` int32 [n, 4] of (table row, first query row, rows, position
    of the first row), ``block_q`` rows at most (``attention.chunk_block_q``), from ``attention.build_metadata``.
    """
    s, nh, d = q.shape
    out = torch.empty(s, nh, num_splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(s, nh, num_splits, device=q.device, dtype=torch.float32)
    if lens is not None and len(lens):
        _launch(q, k_cache, v_cache, block_tables, lens, lens, len(lens), out, lse, 1, tile)
    if tiles is not None and len(tiles):
        _launch(q, k_cache, v_cache, block_tables, tiles, tiles, len(tiles), out, lse, block_q, tile)
    if num_splits == 1:
        return out[:, :, 0].to(q.dtype)
    weights = torch.softmax(lse, dim=-1).unsqueeze(-1)
    return (out * weights).sum(dim=2).to(q.dtype)


def _launch(q, k_cache, v_cache, block_tables, lens, tiles, num_tiles, out, lse, block_q, tile) -> None:
    _, nh, d = q.shape
    _, block_size, nkv, _ = k_cache.shape
    group = nh // nkv
    _paged_attention[(num_tiles, nkv, out.shape[2])](
        q,
        k_cache,
        v_cache,
        block_tables,
        lens,
        tiles,
        out,
        lse,
        d**-0.5,
        out.shape[2],
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
        # tl.dot needs 16+ rows: a decode pads its GQA group, a chunk fills rows with tokens
        GROUP_PAD=max(16, triton.next_power_of_2(group)) if block_q == 1 else triton.next_power_of_2(group),
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        TILE=tile,
        BLOCK_Q=block_q,
        num_warps=4,
    )
