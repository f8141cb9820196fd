"""Paged KV-cache accounting: fixed-size blocks, like vLLM's block manager.

``BlockAllocator`` counts blocks. ``PrefixCachingAllocator`` adds vLLM's automatic prefix caching: block ids,
a full block's KV cached under a chained hash (its parent's hash and its own content), blocks shared by
reference count, and unreferenced cached blocks kept until an allocation needs them (least recently freed
first). The simulator and the GPU engine both use it, so a hit in one is a hit in the other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from fairbatching.core.request import Request
from fairbatching.errors import ConfigError


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """How many KV blocks of how many tokens a node has."""

    num_blocks: int
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ConfigError(f"KV cache needs positive num_blocks and block_size, got {self}")

    @classmethod
    def from_memory(
        cls,
        gpu_memory_bytes: float,
        weight_bytes: float,
        kv_bytes_per_token: float,
        gpu_memory_utilization: float = 0.9,
        activation_reserve_bytes: float = 4e9,
        block_size: int = 16,
    ) -> KVCacheConfig:
        """Blocks left after weights and an activation reserve, as vLLM sizes its cache."""
        free = gpu_memory_bytes * gpu_memory_utilization - weight_bytes - activation_reserve_bytes
        if free <= 0:
            raise ConfigError(
                f"model weights ({weight_bytes / 1e9:.1f} GB) do not fit in {gpu_memory_bytes / 1e9:.1f} GB "
                f"at utilization {gpu_memory_utilization}"
            )
        return cls(num_blocks=int(free // (kv_bytes_per_token * block_size)), block_size=block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


class BlockAllocator:
    """Counts free blocks and the blocks each request holds (``Request.num_blocks``)."""

    __slots__ = ("block_size", "num_blocks", "free_blocks")

    def __init__(self, config: KVCacheConfig) -> None:
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks
        self.free_blocks = config.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, request: Request, new_tokens: int) -> int:
        """Blocks ``request`` must add to hold KV for ``new_tokens`` more tokens."""
        return max(0, -(-(request.num_computed + new_tokens) // self.block_size) - request.num_blocks)

    def allocate(self, request: Request, new_tokens: int) -> None:
        need = self.extra_blocks(request, new_tokens)
        if need > self.free_blocks:
            raise RuntimeError(f"KV over-allocation for {request.request_id}: need {need}, free {self.free_blocks}")
        self.free_blocks -= need
        request.num_blocks += need

    def grow(self, request: Request, need: int) -> None:
        """Give ``request`` ``need`` more blocks (the caller checked they are free)."""
        self.free_blocks -= need
        request.num_blocks += need

    def free(self, request: Request) -> None:
        self.free_blocks += request.num_blocks
        request.num_blocks = 0

    def blocks_freed_by(self, request: Request) -> int:
        """Blocks that preempting ``request`` would make free (all it holds: none are shared here)."""
        return request.num_blocks

    def lookup(self, request: Request) -> None:
        """Start a waiting request's prefill at its cached prefix (nothing is cached here)."""

    def admit(self, request: Request) -> None:
        """Bind a request that joins the running set to its cached prefix (nothing is cached here)."""

    def commit(self, request: Request) -> None:
        """Offer the request's newly computed full blocks to the cache (nothing is cached here)."""

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def caching(self) -> bool:
        return False


def chain_hash(parent: int, content: tuple[int, ...]) -> int:
    """A block's identity: its content and, through ``parent``, everything before it (as vLLM's block hash)."""
    return hash((parent, content))


def token_block_hashes(token_ids: list[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full ``block_size``-token blocks of ``token_ids``."""
    out: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, tuple(token_ids[start : start + block_size]))
        out.append(parent)
    return tuple(out)


def segment_block_hashes(segments: tuple[tuple[int, int], ...], num_tokens: int, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a token sequence known only by content segments: ``(id, tokens)``
    pairs in order, where equal ids at equal offsets stand for equal tokens (Mooncake's 512-token
    ``hash_ids``, a conversation's history). A block's content is the (id, offset) of each token run it covers;
    blocks past the segments (or past ``num_tokens``) get no hash."""
    out: list[int] = []
    parent = 0
    seg = 0
    offset = 0  # tokens of segment ``seg`` already covered
    covered = 0
    limit = num_tokens
    total = 0
    for _sid, length in segments:
        total += length
    if total < limit:
        limit = total
    while covered + block_size <= limit:
        pieces: list[int] = []
        need = block_size
        while need:
            sid, length = segments[seg]
            take = min(need, length - offset)
            pieces.append(sid)
            pieces.append(offset)
            offset += take
            need -= take
            if offset == length:
                seg += 1
                offset = 0
        parent = chain_hash(parent, tuple(pieces))
        out.append(parent)
        covered += block_size
    return tuple(out)


class _Seq:
    """A request's block table (block ids in token order) and how many leading blocks were offered to the cache."""

    __slots__ = ("blocks", "hashed")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.hashed = 0


class PrefixCachingAllocator(BlockAllocator):
    """Block ids with vLLM-style automatic prefix caching.

    ``free_blocks`` counts blocks an allocation may take: never-used ones plus cached blocks no request
    references (evicted, least recently freed first, only when no unused block is left). A waiting request's
    ``num_computed`` starts at its cached prefix (``lookup``), always a whole number of blocks and at least one
    token short of its length, so its prefill is the uncached suffix; ``admit`` pins those blocks (a block
    evicted since then shortens the hit, never lengthens it, so a plan never asks for more KV than it
    reserved). A full block is cached once computed (``commit``); one whose hash is already cached stays the
    request's own. A request's blocks are released last block first, so a prefix's tail is evicted before
    its head.
    """

    __slots__ = ("ref", "block_hash", "cached", "lru", "unused", "seqs")

    def __init__(self, config: KVCacheConfig) -> None:
        super().__init__(config)
        n = config.num_blocks
        self.ref: list[int] = [0] * n
        self.block_hash: list[int | None] = [None] * n
        self.cached: dict[int, int] = {}  # hash -> block id
        # Unreferenced cached block ids, least recently freed first (an OrderedDict pops its head in O(1)).
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.unused: list[int] = list(range(n - 1, -1, -1))
        self.seqs: dict[str, _Seq] = {}

    @property
    def caching(self) -> bool:
        return True

    def table(self, request_id: str) -> list[int]:
        """The block ids ``request_id`` holds, in token order (empty when it holds none)."""
        seq = self.seqs.get(request_id)
        return seq.blocks if seq is not None else []

    def _match(self, request: Request) -> int:
        """Leading blocks of ``request`` cached now, capped so at least its last token is computed."""
        hashes = request.block_hashes
        cap = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        cached = self.cached
        m = 0
        while m < cap and hashes[m] in cached:
            m += 1
        return m

    def lookup(self, request: Request) -> None:
        if request.num_blocks == 0 and request.num_computed == 0 and request.block_hashes:
            request.num_computed = self._match(request) * self.block_size

    def extra_blocks(self, request: Request, new_tokens: int) -> int:
        """As ``BlockAllocator.extra_blocks``, less the cached prefix blocks that two or more running requests
        hold: an admission shares them, and preempting any one holder frees none of them (``blocks_freed_by``),
        so a plan never counts one block both as freed and as shared. A block with one holder, or none, is
        counted as needed: an upper bound, as a plan's KV must be."""
        need = max(0, -(-(request.num_computed + new_tokens) // self.block_size) - request.num_blocks)
        if request.num_blocks == 0 and request.num_computed:
            hashes, cached, ref = request.block_hashes, self.cached, self.ref
            for i in range(request.num_computed // self.block_size):
                b = cached.get(hashes[i])
                if b is not None and ref[b] > 1:
                    need -= 1
        return need

    def admit(self, request: Request) -> None:
        hit = request.num_computed // self.block_size
        first = request.first_scheduled is None
        if hit:
            m = self._match(request)
            if m < hit:
                hit = m
                request.num_computed = hit * self.block_size
            seq = self.seqs.setdefault(request.request_id, _Seq())
            hashes, cached, ref, lru = request.block_hashes, self.cached, self.ref, self.lru
            for i in range(hit):
                b = cached[hashes[i]]
                if ref[b] == 0:
                    del lru[b]
                    self.free_blocks -= 1
                ref[b] += 1
                seq.blocks.append(b)
            seq.hashed = hit
            request.num_blocks = hit
        if first:
            request.prefix_hit = request.num_computed

    def _take(self) -> int:
        if self.unused:
            b = self.unused.pop()
        else:
            b = self.lru.popitem(last=False)[0]
            h = self.block_hash[b]
            assert h is not None, "an evictable block is always cached"
            del self.cached[h]
            self.block_hash[b] = None
        self.ref[b] = 1
        return b

    def allocate(self, request: Request, new_tokens: int) -> None:
        self.grow(request, BlockAllocator.extra_blocks(self, request, new_tokens))

    def grow(self, request: Request, need: int) -> None:
        """Give ``request`` ``need`` more blocks of its own."""
        if need <= 0:
            return
        if need > self.free_blocks:
            raise RuntimeError(f"KV over-allocation for {request.request_id}: need {need}, free {self.free_blocks}")
        seq = self.seqs.get(request.request_id)
        if seq is None:
            seq = self.seqs[request.request_id] = _Seq()
        for _ in range(need):
            seq.blocks.append(self._take())
        self.free_blocks -= need
        request.num_blocks += need

    def commit(self, request: Request) -> None:
        hashes = request.block_hashes
        if not hashes:
            return
        seq = self.seqs.get(request.request_id)
        if seq is None:
            return
        full = min(request.num_computed // self.block_size, len(hashes), len(seq.blocks))
        cached, block_hash = self.cached, self.block_hash
        for i in range(seq.hashed, full):
            h = hashes[i]
            if h not in cached:
                b = seq.blocks[i]
                cached[h] = b
                block_hash[b] = h
        if full > seq.hashed:
            seq.hashed = full

    def free(self, request: Request) -> None:
        seq = self.seqs.pop(request.request_id, None)
        request.num_blocks = 0
        if seq is None:
            return
        ref, lru, block_hash, unused = self.ref, self.lru, self.block_hash, self.unused
        for b in reversed(seq.blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if block_hash[b] is None:
                    unused.append(b)
                else:
                    lru[b] = None
                self.free_blocks += 1

    def blocks_freed_by(self, request: Request) -> int:
        """Blocks preempting ``request`` frees: those no other request also holds."""
        seq = self.seqs.get(request.request_id)
        if seq is None:
            return 0
        ref = self.ref
        return sum([1 for b in seq.blocks if ref[b] == 1])
