"""Profile the engine: time one iteration for a grid of batch compositions and write cost-model rows.

Each composition is a list of (new tokens, tokens already cached) per sequence; it runs through the same
``ModelRunner.run`` the step loop uses (decode-only batches through their CUDA graphs), timed on the wall
clock around the call, which returns only once the sampled tokens are on the host. So a row prices what
an iteration costs the serving loop, host work included, which is what the simulator needs.
"""

from __future__ import annotations

import csv
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fairbatching.core.kv import KVCacheConfig
from fairbatching.costmodel.fit import ROW_FIELDS, FitReport, fit_cost_model
from fairbatching.costmodel.model import BatchFeatures
from fairbatching.costmodel.profile import Profile
from fairbatching.engine.runner import ModelRunner, SeqChunk
from fairbatching.errors import ConfigError

Composition = list[tuple[int, int]]


def default_grid(max_tokens_in_cache: int, max_context: int) -> list[tuple[str, Composition]]:
    """Decode-only, prefill-only (with and without prior context), mixed and multi-prefill batches."""
    out: list[tuple[str, Composition]] = []
    for seqs in (1, 8, 32, 64, 128, 256):
        for ctx in (128, 1024, 2048, 4096):
            out.append(("decode", [(1, ctx)] * seqs))
    for n in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
        for cached in (0, 4096, 16384):
            out.append(("prefill", [(n, cached)]))
    for seqs in (16, 64, 160):
        for ctx in (512, 2048):
            for n in (64, 256, 1024, 2048, 4096):
                for cached in (0, 3000):
                    out.append(("mixed", [(1, ctx)] * seqs + [(n, cached)]))
    for k in (2, 4, 8):
        out.append(("multi-prefill", [(4096 // k, 0)] * k))
        out.append(("mixed-multi", [(1, 1500)] * 48 + [(2048 // k, 1000)] * k))
    return [
        (kind, comp)
        for kind, comp in out
        if sum(n + c for n, c in comp) <= max_tokens_in_cache and max(n + c for n, c in comp) <= max_context
    ]


def time_composition(runner: ModelRunner, comp: Composition, repeats: int, rng: random.Random) -> float:
    """Median wall time of ``runner.run`` for this composition, after one warm-up run."""
    bs = runner.block_size
    vocab = runner.model.config.vocab_size
    blocks = [runner.pool.take(-(-(n + c) // bs)) for n, c in comp]
    try:
        chunks = [
            SeqChunk([rng.randrange(vocab) for _ in range(n)], c, b, True)
            for (n, c), b in zip(comp, blocks, strict=True)
        ]
        runner.run(chunks)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.run(chunks)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    finally:
        for b in blocks:
            runner.pool.give_back(b)


def run_profile(
    runner: ModelRunner,
    grid: list[tuple[str, Composition]],
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """One row per composition: kind, the cost model's features, and the measured latency."""
    if not grid:
        raise ConfigError("empty profiling grid (every composition exceeds the KV cache or max context)")
    rng = random.Random(seed)
    rows = []
    for i, (kind, comp) in enumerate(grid):
        latency = time_composition(runner, comp, repeats, rng)
        f = BatchFeatures.of_chunks(comp)
        row = {
            "kind": kind,
            "new_tokens": f.new_tokens,
            "context_tokens": f.context_tokens,
            "num_seqs": f.num_seqs,
            "attn_work": f.attn_work,
            "latency_s": latency,
        }
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(grid), row)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """Dict rows (profile rows, validation rows) as CSV with a header of every key any row has (blank where a
    row lacks one); nothing for no rows."""
    if rows:
        with Path(path).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            writer.writeheader()
            writer.writerows(rows)


def measured_profile(
    runner: ModelRunner, rows: list[dict], name: str, note: str, hardware: dict
) -> tuple[Profile, FitReport]:
    """The cost model fitted to ``rows``, as a profile of this engine's model and KV cache."""
    report = fit_cost_model([[r[k] for k in ROW_FIELDS] for r in rows])
    model = runner.model
    profile = Profile(
        name=name,
        source="measured",
        model={**model.config.to_dict(), "dtype": str(model.dtype).removeprefix("torch.")},
        hardware=hardware,
        params=report.model.params,
        kv=KVCacheConfig(runner.pool.usable, runner.block_size),
        fit=report.as_dict(),
        note=note,
    )
    return profile, report
