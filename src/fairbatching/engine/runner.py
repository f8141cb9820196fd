"""Runs one iteration of the model: packs the scheduled chunks, calls the model, returns sampled tokens.

On CUDA, as in vLLM: decode-only iterations replay a whole-step CUDA graph captured for the next larger
batch size (padding rows write to a reserved scratch block and are ignored). Mixed iterations up to a few
thousand tokens whose prefill chunks all go to the Triton attention kernel replay a whole-step graph too
(vLLM's full graphs for mixed batches); other mixed iterations of that size replay piecewise graphs with
attention run eagerly between them; larger ones run eagerly.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fairbatching.engine.attention import (
    ROUTES,
    AttentionMetadata,
    PrefillRouting,
    attention,
    build_metadata,
    check_prefill_impl,
    chunk_block_q,
    split_count,
    token_slots,
    triton_inputs,
    warm_cudnn,
)
from fairbatching.engine.graph_sizes import CANDIDATE_TOKEN_SIZES, efficient_sizes, linear_layer_times
from fairbatching.engine.model import LlamaModel
from fairbatching.errors import ConfigError

SCRATCH_BLOCK = 0  # never handed out: CUDA-graph padding rows write here
MAX_GRAPH_CHUNKS = 16  # prefill chunks a whole-step mixed graph has tile room for beyond one per block_q tokens


@dataclass
class SeqChunk:
    """One sequence's part of an iteration: ``token_ids`` are its new tokens at positions from ``cached``."""

    token_ids: list[int]
    cached: int
    block_ids: list[int]
    sample: bool

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.cached > 0


class BlockPool:
    """Physical KV block ids; block 0 is kept back as the scratch block."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ConfigError(f"the engine needs at least 2 KV blocks, got {num_blocks}")
        self.free: list[int] = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))

    @property
    def usable(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"KV block pool exhausted: asked {n}, {len(self.free)} free")
        taken = self.free[-n:] if n else []
        del self.free[len(self.free) - n :]
        return taken

    def give_back(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


T = TypeVar("T")


def _capture(
    runner: ModelRunner, pieces: int, step: Callable[[int, list[T]], T], warmups: int
) -> tuple[list[torch.cuda.CUDAGraph], list[T]]:
    """Warm up, then capture ``pieces`` graphs, piece ``i`` computed by ``step(i, outputs of pieces before i)``.

    The warm-up (cuBLAS handles, workspaces, Triton compilation) runs on a side stream outside any capture; each
    graph is captured into the runner's one memory pool, so graphs captured largest first share its memory.
    Returns the graphs and the static output each one writes on replay."""
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                warm: list[T] = []
                for i in range(pieces):
                    warm.append(step(i, warm))
                del warm  # freed as before the capture, as the graphs will not read it
        torch.cuda.current_stream().wait_stream(stream)
        graphs: list[torch.cuda.CUDAGraph] = []
        outputs: list[T] = []
        for i in range(pieces):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=runner.graph_pool):
                outputs.append(step(i, outputs))
            runner.graph_pool = graph.pool()
            graphs.append(graph)
    return graphs, outputs


def _capture_one(runner: ModelRunner, step: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """A whole step as one graph, after two warm-up runs."""
    (graph,), (output,) = _capture(runner, 1, lambda _i, _outputs: step(), warmups=2)
    return graph, output


class _DecodeGraph:
    """Static buffers and a captured graph for decode batches of one padded size."""

    def __init__(self, runner: ModelRunner, batch: int) -> None:
        dev, width = runner.device, runner.max_blocks_per_seq
        self.batch = batch
        self.token_ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((batch,), SCRATCH_BLOCK * runner.block_size, dtype=torch.int64, device=dev)
        self.tables = torch.full((batch, width), SCRATCH_BLOCK, dtype=torch.int32, device=dev)
        self.lens = torch.ones(batch, dtype=torch.int32, device=dev)
        self.sample_index = torch.arange(batch, device=dev)
        self.meta = AttentionMetadata(
            "cuda",
            self.slots,
            batch,
            runner.block_size,
            block_tables=self.tables,
            context_lens=self.lens,
            num_splits=split_count(batch, runner.max_context),
        )
        model, cache = runner.model, runner.kv_cache
        self.graph, self.output = _capture_one(
            runner, lambda: model.forward(self.token_ids, self.positions, cache, self.meta, self.sample_index)
        )

    def run(self, chunks: list[SeqChunk], block_size: int) -> list[int]:
        n = len(chunks)
        ids = np.zeros(self.batch, dtype=np.int64)
        pos = np.zeros(self.batch, dtype=np.int64)
        slots = np.full(self.batch, SCRATCH_BLOCK * block_size, dtype=np.int64)
        lens = np.ones(self.batch, dtype=np.int32)
        table = np.full(self.tables.shape, SCRATCH_BLOCK, dtype=np.int32)
        for i, c in enumerate(chunks):
            ids[i] = c.token_ids[0]
            pos[i] = c.cached
            slots[i] = c.block_ids[c.cached // block_size] * block_size + c.cached % block_size
            lens[i] = c.cached + 1
            table[i, : len(c.block_ids)] = c.block_ids
        for buf, arr in ((self.token_ids, ids), (self.positions, pos), (self.slots, slots), (self.lens, lens)):
            buf.copy_(torch.from_numpy(arr), non_blocking=True)
        self.tables.copy_(torch.from_numpy(table), non_blocking=True)
        self.graph.replay()
        return self.output[:n].tolist()


class _PiecewiseGraph:
    """Mixed batches padded to ``tokens``: every piece between two attentions (norms, projections, RoPE,
    KV write, MLP) is one captured graph; attention runs eagerly between them on the real tokens, since its
    shape depends on each sequence's context. This is vLLM's piecewise CUDA-graph scheme: without it an
    eager step of a small mixed batch costs more in kernel launches than on the GPU."""

    def __init__(self, runner: ModelRunner, tokens: int) -> None:
        model, cache, dev = runner.model, runner.kv_cache, runner.device
        c = model.config
        self.tokens = tokens
        self.token_ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.slots = torch.full((tokens,), SCRATCH_BLOCK * runner.block_size, dtype=torch.int64, device=dev)
        self.attn_out = torch.zeros(tokens, c.num_heads, c.head_dim, device=dev, dtype=model.dtype)
        self._cache = cache
        layers = len(model.layers)

        def piece(i: int, outputs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
            """Layer i-1's post-attention and layer i's pre-attention; outputs (Q, residual[, cos, sin])."""
            if i == 0:
                cos, sin = model.rope_tables(self.positions)
                h = model.embed[self.token_ids]
                return (*model.pre_attention(0, h, None, cos, sin, cache, self.slots), cos, sin)
            h, residual = model.post_attention(i - 1, self.attn_out, outputs[i - 1][1])
            if i == layers:
                return h, residual
            cos, sin = outputs[0][2], outputs[0][3]
            return model.pre_attention(i, h, residual, cos, sin, cache, self.slots)

        self.graphs, self.outputs = _capture(runner, layers + 1, piece, warmups=1)

    def run(
        self, ids: list[int], pos: list[int], meta: AttentionMetadata, sample_index: list[int], model: LlamaModel
    ) -> list[int]:
        n = len(ids)
        slots = meta.slots
        self.token_ids[:n].copy_(torch.tensor(ids, dtype=torch.int64), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(pos, dtype=torch.int64), non_blocking=True)
        self.slots[:n].copy_(slots)
        self.slots[n:].fill_(SCRATCH_BLOCK * meta.block_size)
        cache = self._cache
        with torch.inference_mode():
            self.graphs[0].replay()
            for i, graph in enumerate(self.graphs[1:]):
                q = self.outputs[i][0]
                self.attn_out[:n].copy_(attention(q[:n], cache[i, 0], cache[i, 1], meta))
                graph.replay()
            index = torch.tensor(sample_index, dtype=torch.int64).to(self.token_ids.device, non_blocking=True)
            return model.sample(*self.outputs[-1], index).tolist()


class _StaticInputs:
    """Input buffers every whole-step mixed graph reads (views of one set, sized for the largest graph)."""

    def __init__(self, runner: ModelRunner, tokens: int) -> None:
        dev, block_q = runner.device, runner.routing.block_q
        self.token_ids = torch.empty(tokens, dtype=torch.int64, device=dev)
        self.positions = torch.empty(tokens, dtype=torch.int64, device=dev)
        self.slots = torch.empty(tokens, dtype=torch.int64, device=dev)
        self.tables = torch.empty(tokens, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.lens = torch.empty(tokens, dtype=torch.int32, device=dev)
        self.tiles = torch.empty(tokens // block_q + MAX_GRAPH_CHUNKS, 4, dtype=torch.int32, device=dev)
        self.scratch_slot = SCRATCH_BLOCK * runner.block_size
        self.reset()

    def reset(self) -> None:
        """Every row padding (a decode of the scratch block; no chunk tiles), before a graph is captured: a
        graph captured lazily, after a step ran, would otherwise warm up on that step's tiles, whose rows lie
        past a smaller graph's tokens."""
        self.token_ids.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch_slot)
        self.tables.fill_(SCRATCH_BLOCK)
        self.lens.fill_(1)
        self.tiles.zero_()


class _MixedGraph:
    """Mixed batches padded to ``tokens`` whose prefill chunks all go to the Triton kernel: the whole step,
    attention included, is one CUDA graph. The kernel's launch shape depends on the padded sizes only (rows
    that are not decodes have length 0, spare tiles 0 rows), so one graph serves every such mix. Eager
    attention between piecewise graphs cost about 0.1 ms of host time per layer, more than a small mixed
    step's GPU work (benchmarks/engine_kernels.py)."""

    def __init__(self, runner: ModelRunner, tokens: int) -> None:
        model, cache, inputs = runner.model, runner.kv_cache, runner.static_inputs
        self.tokens, self.inputs = tokens, inputs
        self.max_tiles = tokens // runner.routing.block_q + MAX_GRAPH_CHUNKS
        self.meta = AttentionMetadata(
            "cuda",
            inputs.slots[:tokens],
            tokens,
            runner.block_size,
            block_tables=inputs.tables[:tokens],
            context_lens=inputs.lens[:tokens],
            chunk_tiles=inputs.tiles[: self.max_tiles],
            chunk_block_q=runner.routing.block_q,
            num_splits=max(1, min(16, 512 // tokens)),  # the merge buffer grows with tokens x splits
        )
        ids, pos = inputs.token_ids[:tokens], inputs.positions[:tokens]
        inputs.reset()
        self.graph, self.output = _capture_one(runner, lambda: model.hidden(ids, pos, cache, self.meta))

    def run(self, packed: list[SeqChunk], num_decodes: int, runner: ModelRunner) -> list[int]:
        t, bs = self.tokens, runner.block_size
        spans = [(c.cached, len(c.token_ids), c.block_ids) for c in packed]
        tables, decode_lens, tiles, _splits = triton_inputs(
            spans[:num_decodes], spans[num_decodes:], self.block_q, None
        )
        token_ids, positions, sample_index = _pack(packed)
        n = len(token_ids)
        ids = np.zeros(t, dtype=np.int64)
        pos = np.zeros(t, dtype=np.int64)
        slots = np.full(t, SCRATCH_BLOCK * bs, dtype=np.int64)
        lens = np.ones(t, dtype=np.int32)
        padded_tiles = np.zeros((self.max_tiles, 4), dtype=np.int32)
        ids[:n], pos[:n] = token_ids, positions
        slots[:n] = token_slots(spans, bs)
        lens[:num_decodes] = decode_lens
        lens[num_decodes:n] = 0
        padded_tiles[: len(tiles)] = tiles
        inp = self.inputs
        for buf, arr in ((inp.token_ids, ids), (inp.positions, pos), (inp.slots, slots), (inp.lens, lens)):
            buf[:t].copy_(torch.from_numpy(arr), non_blocking=True)
        inp.tiles[: self.max_tiles].copy_(torch.from_numpy(padded_tiles), non_blocking=True)
        inp.tables[: tables.shape[0], : tables.shape[1]].copy_(torch.from_numpy(tables), non_blocking=True)
        self.graph.replay()
        index = torch.tensor(sample_index, dtype=torch.int64).to(runner.device, non_blocking=True)
        return runner.model.sample(*self.output, index).tolist()

    @property
    def block_q(self) -> int:
        return self.meta.chunk_block_q


G = TypeVar("G", _DecodeGraph, _PiecewiseGraph, _MixedGraph)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int = 16,
        max_context: int = 8192,
        backend: str | None = None,
        cuda_graphs: bool = True,
        graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256),
        piecewise_token_sizes: tuple[int, ...] = CANDIDATE_TOKEN_SIZES,
        prefill_attention: str = "auto",
    ) -> None:
        """``prefill_attention``: see ``attention.PREFILL_IMPLS``; ``auto`` uses cuDNN only on Hopper or newer,
        where it was measured to win. ``piecewise_token_sizes``: the sizes mixed steps may be padded to;
        ``warmup`` keeps those where the matmuls run fastest (``graph_sizes``)."""
        check_prefill_impl(prefill_attention)
        self.model = model
        self.prefill_attention = prefill_attention
        self.cudnn_wins = _cudnn_attention_wins(model.device)
        self.device = model.device
        self.block_size = block_size
        self.max_context = max_context
        self.max_blocks_per_seq = -(-max_context // block_size)
        self.backend = backend or ("cuda" if self.device.type == "cuda" else "reference")
        if self.backend not in ("cuda", "reference"):
            raise ConfigError(f"attention backend must be cuda or reference, got {self.backend!r}")
        if self.backend == "cuda" and self.device.type != "cuda":
            raise ConfigError("the cuda attention backend needs a CUDA device")
        self.kv_cache = model.new_kv_cache(num_blocks, block_size)
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.warmed = False
        self.warmup_bytes: int | None = None  # GPU memory warm-up and the largest step took, where measured
        self.last_path = ""  # how the last step ran: decode-graph, mixed-graph, piecewise or eager (step logs)
        self.graph_pool = None
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes)) if cuda_graphs and self.backend == "cuda" else ()
        self.piecewise_token_sizes = tuple(sorted(piecewise_token_sizes)) if self.graph_batch_sizes else ()
        self.linear_times: dict[int, float] = {}  # one layer's matmuls at each candidate size, from warmup
        self._graphs: dict[tuple[type, int], _DecodeGraph | _PiecewiseGraph | _MixedGraph] = {}
        self._inputs: _StaticInputs | None = None

    def warmup(self) -> None:
        """Compile every decode-kernel variant, build cuDNN's prefill plans, choose the mixed-step sizes and
        capture the graphs before serving, so the first requests of a replay do not pay for JIT compilation,
        plans and capture. Runs once; a no-op on the reference backend, which has nothing to compile."""
        if self.warmed:
            return
        if self.backend == "cuda":
            self._warm_cuda()
        self.warmed = True

    def _warm_cuda(self) -> None:
        from fairbatching.engine.kernels import paged_attention

        c = self.model.config
        q = torch.zeros(1, c.num_heads, c.head_dim, device=self.device, dtype=self.model.dtype)
        table = torch.zeros(1, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        lens = torch.ones(1, dtype=torch.int32, device=self.device)
        tiles = torch.tensor([[0, 0, 1, 0]], dtype=torch.int32, device=self.device)
        k, v = self.kv_cache[0, 0], self.kv_cache[0, 1]
        block_q = self.routing.block_q
        for splits in range(1, split_count(1, self.max_context) + 1):
            paged_attention(q, k, v, table, lens, None, splits)
            paged_attention(q, k, v, table, None, tiles, splits, block_q)
        if self.prefill_attention == "cudnn" or (self.prefill_attention == "auto" and self.cudnn_wins):
            warm_cudnn(c.num_heads, c.num_kv_heads, c.head_dim, self.max_context, self.model.dtype)
        if (
            self.piecewise_token_sizes
            and not self.linear_times
            and all(kind is _DecodeGraph for kind, _size in self._graphs)
        ):
            self.linear_times = linear_layer_times(self.model.layers[0], self.piecewise_token_sizes)
            self.piecewise_token_sizes = efficient_sizes(self.linear_times)
            torch.cuda.empty_cache()  # the timing inputs' blocks, before graphs and steps need the memory
        self.capture_graphs()
        torch.cuda.synchronize()

    def resize_kv(self, num_blocks: int) -> None:
        """A KV cache of ``num_blocks`` in place of this one, with no block in use. The graphs captured over
        the old cache write into it, so they go too and the runner is cold again (compiled kernels and the
        chosen graph sizes stay)."""
        if self.pool.usable != self.num_blocks - 1:
            raise RuntimeError(f"KV cache resized with {self.num_blocks - 1 - self.pool.usable} blocks in use")
        self._graphs.clear()
        self._inputs = None
        self.graph_pool = None
        self.kv_cache = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            gc.collect()  # a graph still referenced from a cycle would hold its memory pool
            torch.cuda.empty_cache()
        self.kv_cache = self.model.new_kv_cache(num_blocks, self.block_size)
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.warmed = False

    @property
    def routing(self) -> PrefillRouting:
        c = self.model.config
        return PrefillRouting(self.prefill_attention, self.cudnn_wins, chunk_block_q(c.num_heads, c.num_kv_heads))

    def capture_graphs(self) -> None:
        """Capture every graph now (largest first, so smaller ones reuse its memory pool)."""
        for b in sorted(self.graph_batch_sizes, reverse=True):
            self._graph(_DecodeGraph, b)
        for t in sorted(self.piecewise_token_sizes, reverse=True):
            self._graph(_PiecewiseGraph, t)
            self._graph(_MixedGraph, t)

    @property
    def graph_counts(self) -> dict[str, int]:
        """Graphs captured so far per kind (decode, piecewise, mixed): what a run logs to show capture ran."""
        return dict(Counter(kind.__name__.strip("_").removesuffix("Graph").lower() for kind, _size in self._graphs))

    def _graph(self, kind: type[G], size: int) -> G:
        """The graph of this kind for this padded size (batch or tokens), captured on first use."""
        graph = self._graphs.get((kind, size))
        if graph is None:
            graph = self._graphs[kind, size] = kind(self, size)
        return graph

    @property
    def static_inputs(self) -> _StaticInputs:
        """The input buffers the whole-step mixed graphs share, sized for the largest."""
        if self._inputs is None:
            self._inputs = _StaticInputs(self, self.piecewise_token_sizes[-1])
        return self._inputs

    def run(self, chunks: list[SeqChunk]) -> list[int | None]:
        """Run one iteration; the sampled token of each chunk that samples, else None, in input order."""
        if not chunks:
            return []
        for c in chunks:
            if c.cached + len(c.token_ids) > self.max_context:
                raise ConfigError(f"sequence of {c.cached + len(c.token_ids)} tokens exceeds max_context")
        routing = self.routing

        def rank(i: int) -> int:  # decodes, then prefill chunks by the attention that serves them
            c = chunks[i]
            return 0 if c.is_decode else 1 + ROUTES.index(routing.route(c.cached, len(c.token_ids)))

        order = sorted(range(len(chunks)), key=rank)
        packed = [chunks[i] for i in order]
        num_decodes = sum(c.is_decode for c in packed)
        if num_decodes == len(packed) and self.graph_batch_sizes and len(packed) <= self.graph_batch_sizes[-1]:
            size = next(b for b in self.graph_batch_sizes if b >= len(packed))
            rows = self._graph(_DecodeGraph, size).run(packed, self.block_size)
            tokens = [t for t, c in zip(rows, packed, strict=True) if c.sample]
            self.last_path = "decode-graph"
        elif (graph := self._full_graph(packed, num_decodes, routing)) is not None:
            tokens = graph.run(packed, num_decodes, self)
            self.last_path = "mixed-graph"
        else:
            tokens = self._mixed(packed, num_decodes, routing)
        if not tokens and self.device.type == "cuda":
            # Nothing sampled (prefill chunks that end mid-prompt), so no copy back waited for the GPU: wait here,
            # or the step's time is only its launch and the next step is charged for it.
            torch.cuda.synchronize(self.device)
        out: list[int | None] = [None] * len(chunks)
        sampled = iter(tokens)
        for i in order:
            if chunks[i].sample:
                out[i] = next(sampled)
        return out

    def _full_graph(self, packed: list[SeqChunk], num_decodes: int, routing: PrefillRouting) -> _MixedGraph | None:
        """The whole-step graph for this mixed batch, if one fits it: every chunk on the Triton kernel, the
        tokens within the largest graph, the chunks' tiles within its room."""
        if not self.piecewise_token_sizes:
            return None
        n = sum(len(c.token_ids) for c in packed)
        chunks = packed[num_decodes:]
        if n > self.piecewise_token_sizes[-1] or any(
            routing.route(c.cached, len(c.token_ids)) != "paged" for c in chunks
        ):
            return None
        graph = self._graph(_MixedGraph, next(t for t in self.piecewise_token_sizes if t >= n))
        tiles = sum(-(-len(c.token_ids) // routing.block_q) for c in chunks)
        return graph if tiles <= graph.max_tiles else None

    def _mixed(self, packed: list[SeqChunk], num_decodes: int, routing: PrefillRouting) -> list[int]:
        dev = self.device
        ids, pos, sample_index = _pack(packed)
        meta = build_metadata(
            self.backend,
            [(c.cached, len(c.token_ids), c.block_ids) for c in packed],
            num_decodes,
            self.block_size,
            dev,
            self.max_blocks_per_seq,
            routing,
        )
        if self.piecewise_token_sizes and len(ids) <= self.piecewise_token_sizes[-1]:
            size = next(t for t in self.piecewise_token_sizes if t >= len(ids))
            self.last_path = "piecewise"
            return self._graph(_PiecewiseGraph, size).run(ids, pos, meta, sample_index, self.model)
        self.last_path = "eager"
        out = self.model.forward(
            torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True),
            torch.tensor(pos, dtype=torch.int64).to(dev, non_blocking=True),
            self.kv_cache,
            meta,
            torch.tensor(sample_index, dtype=torch.int64).to(dev, non_blocking=True),
        )
        return out.tolist()


def _pack(packed: list[SeqChunk]) -> tuple[list[int], list[int], list[int]]:
    """Token ids and positions of an iteration's packed chunks, and the row of each chunk that samples."""
    ids: list[int] = []
    pos: list[int] = []
    sample_index: list[int] = []
    for c in packed:
        ids.extend(c.token_ids)
        pos.extend(range(c.cached, c.cached + len(c.token_ids)))
        if c.sample:
            sample_index.append(len(ids) - 1)
    return ids, pos, sample_index


def _cudnn_attention_wins(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )
