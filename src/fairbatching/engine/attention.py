"""Attention over a paged KV cache for one iteration's packed tokens: decodes first, then prefill chunks.

Two backends share one metadata object, built once per iteration:
- ``reference`` (CPU, and the yardstick on GPU): per sequence, gather its K/V from its blocks and run SDPA
  with a bottom-right causal mask (a chunk sees all earlier context and itself).
- ``cuda``: decodes read K/V straight from the blocks with a Triton split-K kernel (``kernels.py``). Each
  prefill chunk goes one of three ways (``PrefillRouting``): the same Triton kernel (``paged``), one
  FlashAttention-2 varlen call shared by all such chunks over their gathered context (``varlen``), or SDPA
  on cuDNN's fused attention, one call per chunk (``cudnn``). ``auto``, measured on an H100
  (benchmarks/engine_kernels.py): short chunks (``PAGED_MAX_TOKENS``) go to the Triton kernel
  (FlashAttention-2 leaves most SMs idle on short chunks over long context, and a step whose chunks all run
  on the Triton kernel replays as one CUDA graph); fresh chunks of ``CUDNN_MIN_TOKENS`` or more to cuDNN
  (faster than FlashAttention-2 on long fresh chunks, but slower over earlier context, and one call per chunk
  costs host time that only long chunks repay); the rest to varlen. The numbers: results/gpu-engine/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbatching.errors import ConfigError

PREFILL_IMPLS = ("auto", "varlen", "cudnn", "paged")
CUDNN_MIN_TOKENS = 1024
# Longest chunks the Triton kernel takes, over earlier context and fresh: where engine_kernels.py measured it
# beating FlashAttention-2 varlen (results/gpu-engine/README.md).
PAGED_MAX_TOKENS = 256
PAGED_MAX_FRESH_TOKENS = 512
# cuDNN builds an execution plan for every new sequence length, which costs more than the attention it saves
# (measured: prefill-carrying serving steps ran slower than profiled, results/gpu-engine/README.md). Fresh
# chunks are padded up to a multiple of this, so a few dozen plans, built at warm-up, cover every length;
# causality keeps the padding keys out of every real row.
CUDNN_PAD = 256
ROUTES = ("paged", "varlen", "cudnn")  # the order chunks are packed in, after the decodes
CHUNK_ROWS = 64  # query rows one Triton program holds for a chunk: tokens x the GQA group padded to a power of 2


def check_prefill_impl(prefill_impl: str) -> None:
    if prefill_impl not in PREFILL_IMPLS:
        raise ConfigError(f"prefill attention must be one of {', '.join(PREFILL_IMPLS)}, got {prefill_impl!r}")


def chunk_block_q(num_heads: int, num_kv_heads: int) -> int:
    """Tokens per Triton program for prefill chunks."""
    group = num_heads // num_kv_heads
    return max(1, CHUNK_ROWS // (1 << (group - 1).bit_length()))


@dataclass(frozen=True)
class PrefillRouting:
    """Which attention kernel serves each prefill chunk.

    ``impl``: one of ``PREFILL_IMPLS`` (a fixed kernel for every chunk, or ``auto``); ``cudnn``: whether
    ``auto`` may use cuDNN (measured to win only on Hopper or newer); ``block_q``: query tokens per program
    of the Triton kernel (``chunk_block_q`` of the model's heads)."""

    impl: str = "auto"
    cudnn: bool = True
    block_q: int = 16

    def __post_init__(self) -> None:
        check_prefill_impl(self.impl)

    def route(self, cached: int, new: int) -> str:
        if self.impl != "auto":
            return self.impl
        if new <= (PAGED_MAX_TOKENS if cached else PAGED_MAX_FRESH_TOKENS):
            return "paged"
        if not cached and new >= CUDNN_MIN_TOKENS and self.cudnn:
            return "cudnn"
        return "varlen"


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence reads.

    Tokens are packed as ``num_decodes`` single-token decodes, then the prefill chunks in ``ROUTES`` order:
    Triton (paged), varlen, cuDNN. ``slots`` are flat cache indices (block * block_size + offset) of the new
    tokens.
    """

    backend: str
    slots: torch.Tensor
    num_decodes: int
    block_size: int
    # rows on the Triton kernel: decodes, then chunks in tiles of ``chunk_block_q`` tokens
    block_tables: torch.Tensor | None = None  # [decodes + chunks, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, including the new token
    chunk_tiles: torch.Tensor | None = None  # [tiles, 4] int32: table row, first query row, rows, position
    chunk_block_q: int = 16
    paged_q: int = 0  # query rows of the chunks
    num_splits: int = 1
    # chunks that gather their context: offsets into the gathered part (after the Triton chunks)
    cu_q: torch.Tensor | None = None  # [P + 1] int32
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    varlen_q: int = 0  # query rows and context rows of the varlen group
    varlen_k: int = 0
    prefill_context_slots: torch.Tensor | None = None  # every context slot of every gathering chunk, packed
    # chunks after the varlen group, one cuDNN call each: q start, q end, k start, k end in the gathered part,
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
    routing: PrefillRouting = PrefillRouting("varlen"),
) -> AttentionMetadata:
    """``chunks``: (tokens already cached, new tokens, block ids) per sequence, decodes first, then prefill
    chunks in ``ROUTES`` order of ``routing.route`` (the runner packs them so)."""
    slots, routes, gathered = _place_tokens(backend, chunks, num_decodes, block_size, routing)

    def tensor(values, dtype=torch.int64):
        return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)

    meta = AttentionMetadata(backend, tensor(np.concatenate(slots)), num_decodes, block_size)
    if backend == "reference":
        seqs, start = [], 0
        for new, ctx, _pad in gathered:
            seqs.append((start, start + new, tensor(ctx)))
            start += new
        meta.sequences = seqs
        return meta
    decodes, prefills = chunks[:num_decodes], chunks[num_decodes:]
    paged = [p for p, r in zip(prefills, routes, strict=True) if r == "paged"]
    if decodes or paged:
        tables, lens, tiles, splits = triton_inputs(decodes, paged, routing.block_q, max_blocks)
        meta.block_tables = tensor(tables, torch.int32)
        meta.context_lens = tensor(lens, torch.int32) if decodes else None
        meta.chunk_tiles = tensor(tiles, torch.int32) if paged else None
        meta.chunk_block_q, meta.paged_q, meta.num_splits = routing.block_q, sum(n for _c, n, _b in paged), splits
    if gathered:
        varlen = prefills[len(paged) : len(paged) + routes.count("varlen")]
        _add_gathered(meta, gathered, varlen, tensor)
    return meta


def _place_tokens(
    backend: str,
    chunks: list[tuple[int, int, list[int]]],
    num_decodes: int,
    block_size: int,
    routing: PrefillRouting,
) -> tuple[list[np.ndarray], list[str], list[tuple[int, np.ndarray, bool]]]:
    """Each sequence's new-token slots, each prefill chunk's route, and (new tokens, context slots, padded)
    of each chunk that gathers its context (every chunk on the reference backend)."""
    slots: list[np.ndarray] = []
    routes: list[str] = []
    gathered: list[tuple[int, np.ndarray, bool]] = []
    for i, (cached, new, blocks) in enumerate(chunks):
        table = np.asarray(blocks, dtype=np.int64)
        if backend != "reference" and i < num_decodes:
            slots.append(_slots(table, block_size, cached, cached + 1))  # a decode only writes; the kernel reads
            continue
        route = "reference" if backend == "reference" else routing.route(cached, new)
        if routes and route != "reference" and ROUTES.index(route) < ROUTES.index(routes[-1]):
            raise ValueError(f"prefill chunks must be packed in {ROUTES} order, got {route} after {routes[-1]}")
        routes.append(route)
        slots.append(_slots(table, block_size, cached, cached + new))
        if route == "paged":
            continue
        ctx = _slots(table, block_size, 0, cached + new)
        pad = route == "cudnn" and cached == 0
        if pad and new % CUDNN_PAD:  # slot 0 (the runner's scratch block) holds finite values
            ctx = np.concatenate([ctx, np.zeros(CUDNN_PAD - new % CUDNN_PAD, dtype=np.int64)])
        gathered.append((new, ctx, pad))
    return slots, routes, gathered


def _add_gathered(
    meta: AttentionMetadata,
    gathered: list[tuple[int, np.ndarray, bool]],
    varlen: list[tuple[int, int, list[int]]],
    tensor: Callable[..., torch.Tensor],
) -> None:
    """The gathering chunks' offsets: the ``varlen`` chunks (the first of ``gathered``) share one call; every
    cuDNN chunk after them gets its own."""
    split = len(varlen)
    cu_q = _cumsum([n for n, _ctx, _p in gathered])
    cu_k = _cumsum([len(ctx) for _n, ctx, _p in gathered])
    if split:
        meta.cu_q = tensor(cu_q[: split + 1], torch.int32)
        meta.cu_k = tensor(cu_k[: split + 1], torch.int32)
        meta.max_q = max(n for _c, n, _b in varlen)
        meta.max_k = max(c + n for c, n, _b in varlen)
        meta.varlen_q, meta.varlen_k = cu_q[split], cu_k[split]
    if split < len(gathered):
        padded = [p for _n, _ctx, p in gathered]
        meta.cudnn_spans = list(
            zip(cu_q[split:-1], cu_q[split + 1 :], cu_k[split:-1], cu_k[split + 1 :], padded[split:], strict=True)
        )
    meta.prefill_context_slots = tensor(np.concatenate([ctx for _n, ctx, _p in gathered]))


def triton_inputs(
    decodes: list[tuple[int, int, list[int]]],
    chunks: list[tuple[int, int, list[int]]],
    block_q: int,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """What the Triton kernel reads for these decodes and chunks (query rows packed in that order): block
    tables (decodes, then chunks), decode lengths, chunk tiles, and a split count that fills the GPU."""
    tables = _table(decodes + chunks, width)
    lens = np.array([c + n for c, n, _b in decodes], dtype=np.int32)
    tiles, row = [], len(decodes)
    for i, (cached, new, _b) in enumerate(chunks):
        tiles.extend((len(decodes) + i, row + t, min(block_q, new - t), cached + t) for t in range(0, new, block_q))
        row += new
    longest = max(c + n for c, n, _b in decodes + chunks)
    return tables, lens, np.array(tiles, dtype=np.int32).reshape(-1, 4), split_count(len(lens) + len(tiles), longest)


def token_slots(chunks: list[tuple[int, int, list[int]]], block_size: int) -> np.ndarray:
    """Flat cache slots of every new token of these (cached, new, blocks) chunks, packed in order."""
    return np.concatenate([_slots(np.asarray(b, dtype=np.int64), block_size, c, c + n) for c, n, b in chunks])


def _slots(table: np.ndarray, block_size: int, start: int, end: int) -> np.ndarray:
    """Flat cache slots of positions ``start..end-1`` of a sequence with these blocks."""
    pos = np.arange(start, end)
    return table[pos // block_size] * block_size + pos % block_size


def _table(chunks: list[tuple[int, int, list[int]]], width: int | None) -> np.ndarray:
    table = np.zeros((len(chunks), width or max(len(b) for _c, _n, b in chunks)), dtype=np.int32)
    for i, (_c, _n, blocks) in enumerate(chunks):
        table[i, : len(blocks)] = blocks
    return table


def split_count(num_tiles: int, max_context: int, target_programs: int = 1024) -> int:
    """Splits of the Triton kernel: long contexts are split across programs when there are too few query
    tiles (decodes, chunk tiles) to fill the GPU."""
    return max(1, min(16, target_programs // max(1, num_tiles * 8), max_context // 256))


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

    from fairbatching.engine.kernels import paged_attention

    npg = meta.num_decodes + meta.paged_q  # rows on the Triton kernel
    d = q.shape[2]
    nkv = k_cache.shape[2]
    parts = []
    if npg:
        parts.append(
            paged_attention(
                q[:npg],
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens,
                meta.chunk_tiles,
                meta.num_splits,
                meta.chunk_block_q,
            )
        )
    if meta.prefill_context_slots is not None:
        k = k_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        v = v_cache.view(-1, nkv, d)[meta.prefill_context_slots]
        if meta.cu_q is not None:
            nq, nk, window = npg + meta.varlen_q, meta.varlen_k, (-1, 0)
            parts.append(
                varlen_attn(q[npg:nq], k[:nk], v[:nk], meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, window_size=window)
            )
        if meta.cudnn_spans:
            parts.append(_cudnn_chunks(q[npg:], k, v, meta.cudnn_spans))
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
