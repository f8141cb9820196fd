"""Measure one-iteration latency of a Llama-shaped model on the GPU for a grid of batch compositions.

Writes profile rows (new_tokens, context_tokens, num_seqs, attn_work, latency_s) for `fairbatching
fit-profile`. The model is the full 32-layer Llama-3-8B layer stack with random bf16 weights: fused QKV,
RoPE, FlashAttention varlen over each sequence's whole context (chunked prefill = causal window (-1, 0), bottom-right
aligned), SwiGLU MLP, RMSNorm, and the LM head on each sequence's last token. K/V of the new tokens are
written into a cache buffer that attention then reads, as an engine does; one cache buffer serves every
layer (the bytes read per layer are the same; it is far larger than L2). Each composition is captured in
a CUDA graph (as vLLM does for its steps) and timed with CUDA events, median of repeats.

This is a measurement harness for the cost model, not the paged serving engine (issue 3).
Run on the device:  PYTHONPATH=src python3 benchmarks/gpu_profile_batches.py --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

from fairbatching.costmodel.model import BatchFeatures

L, H, NH, NKV, HD, FF, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
DEV = "cuda"
DT = torch.bfloat16
GQA_NATIVE = True


def probe_gqa() -> bool:
    """Does this PyTorch's varlen kernel take fewer K/V heads than query heads?"""
    q = torch.randn(8, NH, HD, device=DEV, dtype=DT)
    kv = torch.randn(8, NKV, HD, device=DEV, dtype=DT)
    cu = torch.tensor([0, 8], device=DEV, dtype=torch.int32)
    try:
        varlen_attn(q, kv, kv, cu, cu, 8, 8, window_size=(-1, 0))
        return True
    except Exception as exc:
        print(f"varlen_attn without GQA ({type(exc).__name__}: {exc}); expanding K/V heads", file=sys.stderr)
        return False


class Stack:
    def __init__(self, layers: int, max_ctx: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, device=DEV, dtype=DT, generator=g) * 0.02).contiguous()

        self.layers = [
            (
                w(H, (NH + 2 * NKV) * HD),
                w(NH * HD, H),
                w(H, 2 * FF),
                w(FF, H),
                torch.ones(H, device=DEV, dtype=DT),
                torch.ones(H, device=DEV, dtype=DT),
            )
            for _ in range(layers)
        ]
        self.lm_head = w(H, VOCAB)
        self.k_cache = torch.randn(max_ctx, NKV, HD, device=DEV, dtype=DT, generator=g)
        self.v_cache = torch.randn(max_ctx, NKV, HD, device=DEV, dtype=DT, generator=g)
        inv = 1.0 / (500000 ** (torch.arange(0, HD, 2, device=DEV, dtype=torch.float32) / HD))
        self.inv_freq = inv

    def build(self, chunks: list[tuple[int, int]]):
        """Static inputs for one composition: (new tokens, tokens already cached) per sequence."""
        q_lens = [n for n, _ in chunks]
        k_lens = [n + c for n, c in chunks]
        cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
        # Where each new token's K/V lands in the cache: the tail of its sequence's context.
        slots = torch.cat(
            [torch.arange(cu_k[i + 1].item() - n, cu_k[i + 1].item(), device=DEV) for i, n in enumerate(q_lens)]
        )
        pos = torch.cat([torch.arange(c, c + n, device=DEV) for n, c in chunks]).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(DT)[:, None, :], freqs.sin().to(DT)[:, None, :]
        last = cu_q[1:].long() - 1
        x = torch.randn(sum(q_lens), H, device=DEV, dtype=DT)
        return dict(
            x=x,
            cu_q=cu_q,
            cu_k=cu_k,
            max_q=max(q_lens),
            max_k=max(k_lens),
            slots=slots,
            cos=cos,
            sin=sin,
            last=last,
            total_k=int(cu_k[-1].item()),
        )

    def forward(self, b) -> torch.Tensor:
        x = b["x"]
        t = x.shape[0]
        for wqkv, wo, wgu, wd, n1, n2 in self.layers:
            h = F.rms_norm(x, (H,), n1)
            qkv = h @ wqkv
            q = qkv[:, : NH * HD].view(t, NH, HD)
            k = qkv[:, NH * HD : (NH + NKV) * HD].view(t, NKV, HD)
            v = qkv[:, (NH + NKV) * HD :].view(t, NKV, HD)
            q, k = _rope(q, b["cos"], b["sin"]), _rope(k, b["cos"], b["sin"])
            self.k_cache.index_copy_(0, b["slots"], k)
            self.v_cache.index_copy_(0, b["slots"], v)
            kk, vv = self.k_cache[: b["total_k"]], self.v_cache[: b["total_k"]]
            if not GQA_NATIVE:
                kk, vv = kk.repeat_interleave(NH // NKV, dim=1), vv.repeat_interleave(NH // NKV, dim=1)
            a = varlen_attn(q, kk, vv, b["cu_q"], b["cu_k"], b["max_q"], b["max_k"], window_size=(-1, 0))
            x = x + a.reshape(t, NH * HD) @ wo
            gu = F.rms_norm(x, (H,), n2) @ wgu
            x = x + (F.silu(gu[:, :FF]) * gu[:, FF:]) @ wd
        return (x[b["last"]] @ self.lm_head).argmax(-1)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = t[..., : HD // 2], t[..., HD // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def time_it(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def measure(stack: Stack, chunks: list[tuple[int, int]], repeats: int) -> tuple[float, bool]:
    b = stack.build(chunks)
    for _ in range(2):
        stack.forward(b)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stack.forward(b)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            stack.forward(b)
        graph.replay()
        torch.cuda.synchronize()
        return time_it(graph.replay, repeats), True
    except Exception as exc:  # capture unsupported for this shape: time eager, and say so in the row
        print(f"graph capture failed for {len(chunks)} seqs: {type(exc).__name__}: {exc}", file=sys.stderr)
        torch.cuda.synchronize()
        return time_it(lambda: stack.forward(b), repeats), False


def grid() -> list[tuple[str, list[tuple[int, int]]]]:
    out = []
    for s in (1, 8, 32, 64, 128, 256):
        for ctx in (128, 1024, 4096):
            if s * ctx <= 600_000:
                out.append(("decode", [(1, ctx)] * s))
    for n in (64, 256, 1024, 2048, 4096, 8192):
        for c in (0, 4096, 16384):
            out.append(("prefill", [(n, c)]))
    for s in (16, 64, 160):
        for ctx in (512, 2048):
            for n in (128, 512, 2048, 4096):
                for c in (0, 3000):
                    out.append(("mixed", [(1, ctx)] * s + [(n, c)]))
    for k in (2, 4, 8):
        out.append(("multi-prefill", [(4096 // k, 0)] * k))
        out.append(("mixed-multi", [(1, 1500)] * 48 + [(2048 // k, 1000)] * k))
    return out


def ceilings() -> dict[str, float]:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy = time_it(lambda: b.copy_(a), 10)
    m = torch.randn(8192, 8192, device=DEV, dtype=DT)
    mm = time_it(lambda: m @ m, 10)
    return {"copy_bytes_per_s": 2 * n / copy, "bf16_matmul_flops": 2 * 8192**3 / mm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=L)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    global GQA_NATIVE
    GQA_NATIVE = probe_gqa()
    props = torch.cuda.get_device_properties(0)
    info = {
        "device": props.name,
        "torch": torch.__version__,
        "layers": args.layers,
        "gqa_native": GQA_NATIVE,
        **ceilings(),
    }
    print(json.dumps(info), flush=True)
    stack = Stack(args.layers, max_ctx=700_000)
    rows = []
    t0 = time.time()
    for kind, chunks in grid():
        latency, graphed = measure(stack, chunks, args.repeats)
        f = BatchFeatures.of_chunks(chunks)
        rows.append(
            {
                "kind": kind,
                "new_tokens": f.new_tokens,
                "context_tokens": f.context_tokens,
                "num_seqs": f.num_seqs,
                "attn_work": f.attn_work,
                "latency_s": latency,
                "cuda_graph": graphed,
            }
        )
        print(
            f"{kind:13s} seqs={f.num_seqs:4d} new={f.new_tokens:6d} ctx={f.context_tokens:7d} "
            f"{latency * 1e3:8.2f} ms graph={graphed}",
            flush=True,
        )
        torch.cuda.empty_cache()
    with (args.out / "rows.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / "device.json").write_text(json.dumps({**info, "seconds": time.time() - t0}, indent=2))
    weights = sum(t.numel() for layer in stack.layers for t in layer) * 2 + stack.lm_head.numel() * 2
    floor = weights / info["copy_bytes_per_s"]  # the copy rate counts bytes read plus written
    print(
        f"weights {weights / 1e9:.1f} GB -> bandwidth floor per step {floor * 1e3:.2f} ms; "
        f"matmul {info['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s; copy {info['copy_bytes_per_s'] / 1e12:.2f} TB/s"
    )
    if not math.isfinite(floor):
        sys.exit(1)


if __name__ == "__main__":
    main()
