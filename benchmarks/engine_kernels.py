"""Kernel-level choices of the GPU engine, measured on the device in one short command.

1. fused: each Triton kernel of ``engine/fused.py`` against the plain-torch code it replaces (Llama-3-8B
   shapes, bf16), time and largest difference, at decode-sized and prefill-sized token counts.
2. prefill attention: every backend this PyTorch offers for causal prefill chunks (Llama-3-8B heads, GQA
   32/8, d=128), with and without prior context: FlashAttention-2 varlen (the engine's first backend),
   SDPA on cuDNN, SDPA on its flash backend, FlexAttention compiled by Inductor. Time, TFLOP/s and the
   largest difference to the varlen output.
3. cuDNN's first call at a new sequence length (plan building) against a repeat call.
4. chunk attention: prefill chunks over earlier context (and small fresh ones) as the engine runs them, from
   the paged cache: the Triton paged kernel, FlashAttention-2 varlen and cuDNN (both after gathering the
   context). Sets ``attention.PAGED_MAX_TOKENS``.

Run on the device:
  PYTHONPATH=src python3 benchmarks/engine_kernels.py --out $OUT [--sections chunk_attention,...]
Writes kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from fairbatching.engine import fused
from fairbatching.engine.model import _rope
from fairbatching.engine.timing import cuda_time


def fused_rows() -> list[dict]:
    return [row for t in (64, 2048, 8192) for row in _fused_rows_at(t)]


def _fused_rows_at(t: int) -> list[dict]:
    nh, nkv, d, hidden, ff = 32, 8, 128, 4096, 14336
    bf = dict(device="cuda", dtype=torch.bfloat16)
    k_cache = torch.zeros(4096, 16, nkv, d, **bf)
    v_cache = torch.zeros_like(k_cache)
    w = torch.rand(hidden, **bf)
    qkv = torch.randn(t, (nh + 2 * nkv) * d, **bf)
    freqs = torch.arange(t, device="cuda")[:, None] * torch.rand(d // 2, device="cuda")[None, :]
    cos, sin = freqs.cos().bfloat16()[:, None, :], freqs.sin().bfloat16()[:, None, :]
    slots = torch.randperm(4096 * 16, device="cuda")[:t]

    def rope_torch():
        q = _rope(qkv[:, : nh * d].view(t, nh, d), cos, sin)
        k = _rope(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d), cos, sin)
        k_cache.view(-1, nkv, d).index_copy_(0, slots, k)
        v_cache.view(-1, nkv, d).index_copy_(0, slots, qkv[:, (nh + nkv) * d :].view(t, nkv, d))
        return q

    def rope_fused():
        return fused.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, nh, nkv)

    x, res = torch.randn(t, hidden, **bf), torch.randn(t, hidden, **bf)

    def norm_torch():
        r = res + x
        return F.rms_norm(r, (hidden,), w, 1e-5), r

    def norm_fused():
        return fused.add_rms_norm(x, res, w, 1e-5)

    gu = torch.randn(t, 2 * ff, **bf)

    def swiglu_torch():
        return F.silu(gu[:, :ff]) * gu[:, ff:]

    def swiglu_fused():
        return fused.silu_mul(gu)

    rows = []
    for name, ref_fn, new_fn in (
        ("rope_write_kv", rope_torch, rope_fused),
        ("add_rms_norm", norm_torch, norm_fused),
        ("silu_mul", swiglu_torch, swiglu_fused),
    ):
        ref, new = ref_fn(), new_fn()
        if isinstance(ref, tuple):
            ref, new = ref[0], new[0]
        row = {
            "kernel": name,
            "tokens": t,
            "torch_ms": cuda_time(ref_fn, 20) * 1e3,
            "fused_ms": cuda_time(new_fn, 20) * 1e3,
            "max_abs_diff": (ref.float() - new.float()).abs().max().item(),
        }
        row["speedup"] = row["torch_ms"] / row["fused_ms"]
        rows.append(row)
        print(
            f"fused {name:14s} t={t:5d} torch {row['torch_ms']:7.3f} ms fused {row['fused_ms']:7.3f} ms "
            f"x{row['speedup']:.2f} diff {row['max_abs_diff']:.4f}",
            flush=True,
        )
    return rows


def attention_rows() -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    shapes = ((2048, 0), (4096, 0), (8192, 0), (2048, 4096), (512, 6144))
    return [row for n, prior in shapes for row in _attention_rows_at(n, prior, flex)]


def _attention_rows_at(n: int, prior: int, flex) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.varlen import varlen_attn

    nh, nkv, d = 32, 8, 128
    total = n + prior
    q = torch.randn(n, nh, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, nkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu_q = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, total], device="cuda", dtype=torch.int32)
    flops = 4 * nh * d * (n * prior + n * (n + 1) / 2)
    qb, kb, vb = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    mask = causal_lower_right(n, total) if prior else None

    def varlen():
        return varlen_attn(q, k, v, cu_q, cu_k, n, total, window_size=(-1, 0))

    def sdpa(backend, gqa):
        def run():
            kk, vv = (kb, vb) if gqa else (kb.repeat_interleave(nh // nkv, 1), vb.repeat_interleave(nh // nkv, 1))
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(
                    qb, kk, vv, attn_mask=mask, is_causal=not prior, enable_gqa=gqa, scale=d**-0.5
                )
            return o[0].transpose(0, 1)

        return run

    def flex_run():
        def causal(b, h, qi, ki):
            return qi + prior >= ki

        bm = create_block_mask(causal, None, None, n, total, device="cuda")
        return flex(qb, kb, vb, block_mask=bm, enable_gqa=True, scale=d**-0.5)[0].transpose(0, 1)

    ref = varlen()
    cases = {
        "varlen_fa2": varlen,
        "sdpa_cudnn_gqa": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "sdpa_cudnn_expanded": sdpa(SDPBackend.CUDNN_ATTENTION, False),
        "sdpa_flash_gqa": sdpa(SDPBackend.FLASH_ATTENTION, True),
        "flex_inductor": flex_run,
    }
    rows = []
    for name, fn in cases.items():
        row = {"backend": name, "new_tokens": n, "prior_context": prior}
        try:
            out = fn()
            row["ms"] = cuda_time(fn, 20) * 1e3
            row["tflops"] = flops / row["ms"] / 1e9
            row["max_abs_diff_vs_varlen"] = (out.float() - ref.float()).abs().max().item()
            print(
                f"attention {name:20s} n={n:5d} prior={prior:5d} {row['ms']:8.3f} ms "
                f"{row['tflops']:6.1f} TFLOP/s diff {row['max_abs_diff_vs_varlen']:.4f}",
                flush=True,
            )
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"attention {name:20s} n={n:5d} prior={prior:5d} ERROR {row['error']}", flush=True)
        rows.append(row)
    return rows


def cudnn_new_length_rows() -> list[dict]:
    """Host wall time of cuDNN SDPA's first call at a new sequence length against a repeat call: the price
    of building a plan, paid on every new length unless lengths are padded to a few buckets."""
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for n in (3001, 3002, 3003):
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        rows.append({"tokens": n, "first_call_ms": times[0] * 1e3, "repeat_call_ms": times[1] * 1e3})
        print(f"cudnn new length {n}: first call {times[0] * 1e3:.2f} ms, repeat {times[1] * 1e3:.2f} ms", flush=True)
    return rows


def chunk_attention_rows() -> list[dict]:
    """Each route of the engine's attention on the same chunks (Llama-3-8B heads, 16-token blocks): GPU time of
    one layer's attention, and host time of the step's metadata (built once for all layers)."""
    import time

    from fairbatching.engine.attention import PrefillRouting, attention, build_metadata, chunk_block_q

    nh, nkv, d, bs = 32, 8, 128, 16
    bf = dict(device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(8192, bs, nkv, d, **bf)
    v_cache = torch.randn_like(k_cache)
    free = torch.randperm(8191).add(1).tolist()
    shapes = [[(n, c)] for c in (1024, 4096, 16384) for n in (16, 64, 128, 256, 512, 1024, 2048)]
    shapes += [[(n, 0)] for n in (64, 256, 512)] + [[(256, 2048)] * 4, [(64, 1000)] * 8]
    rows = []
    for comp in shapes:
        chunks, taken = [], 0
        for n, c in comp:
            need = -(-(n + c) // bs)
            chunks.append((c, n, free[taken : taken + need]))
            taken += need
        q = torch.randn(sum(n for n, _c in comp), nh, d, **bf)
        ref = None
        for impl in ("paged", "varlen", "cudnn"):
            routing = PrefillRouting(impl, block_q=chunk_block_q(nh, nkv))
            t0 = time.perf_counter()
            meta = build_metadata("cuda", chunks, 0, bs, q.device, None, routing)
            torch.cuda.synchronize()
            meta_ms = (time.perf_counter() - t0) * 1e3

            def run(q=q, meta=meta):
                return attention(q, k_cache, v_cache, meta)

            out = run()
            ref = out if ref is None else ref
            row = {
                "route": impl,
                "chunks": len(comp),
                "new_tokens": comp[0][0],
                "prior_context": comp[0][1],
                "ms": cuda_time(run, 20) * 1e3,
                "metadata_ms": meta_ms,
                "max_abs_diff_vs_paged": (out.float() - ref.float()).abs().max().item(),
            }
            rows.append(row)
            print(
                f"chunk attention {impl:6s} {len(comp)} x n={comp[0][0]:5d} prior={comp[0][1]:5d} "
                f"{row['ms']:8.3f} ms (metadata {meta_ms:.2f} ms) diff {row['max_abs_diff_vs_paged']:.4f}",
                flush=True,
            )
    return rows


SECTIONS = {
    "fused": fused_rows,
    "prefill_attention": attention_rows,
    "cudnn_new_length": cudnn_new_length_rows,
    "chunk_attention": chunk_attention_rows,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in args.sections.split(","):
        fn = SECTIONS[name]
        try:
            report[name] = fn()
        except Exception as exc:
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        (args.out / "kernels.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
