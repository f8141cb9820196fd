"""Paged KV-cache accounting: fixed-size blocks, like vLLM's block manager."""

from __future__ import annotations

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

    def free(self, request: Request) -> None:
        self.free_blocks += request.num_blocks
        request.num_blocks = 0

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks
