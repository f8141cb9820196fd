"""Triton kernels fusing the memory-bound work between the GEMMs of a layer.

Run eagerly, a prefill step spends a sixth of its time in elementwise kernels: RoPE alone is eight of them
per projection (slice, multiply, subtract, concatenate), plus the KV scatter, the residual adds, SwiGLU's
SiLU and product. Each of these reads and writes activations that are as large as a GEMM's input. Here
each job is one pass over memory, as in vLLM's custom ops:

- ``rope_write_kv``: rotates Q and K of the fused QKV projection, returns Q and writes K and V into their
  cache slots.
- ``add_rms_norm``: adds a sublayer's output to the residual stream and normalises the sum.
- ``silu_mul``: SwiGLU's ``silu(gate) * up``.

Each has a plain-torch twin in ``model.py`` (the CPU path, exact against Hugging Face); the math runs in
float32 here and rounds once, so on bf16 they agree to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write_kv(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qkv,
    stride_cs,
    stride_q,
    stride_slot,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    """One token per program: every head of Q, K and V as [heads, half] tiles."""
    token = tl.program_id(0)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + token * stride_cs + d).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cs + d).to(tl.float32)
    row = qkv_ptr + token * stride_qkv

    h = tl.arange(0, HEADS_PAD)[:, None]
    qm = h < NUM_HEADS
    a = tl.load(row + h * 2 * HALF + d, mask=qm, other=0.0).to(tl.float32)
    b = tl.load(row + h * 2 * HALF + HALF + d, mask=qm, other=0.0).to(tl.float32)
    out = q_ptr + token * stride_q + h * 2 * HALF + d
    tl.store(out, (a * cos - b * sin).to(q_ptr.dtype.element_ty), mask=qm)
    tl.store(out + HALF, (b * cos + a * sin).to(q_ptr.dtype.element_ty), mask=qm)

    kh = tl.arange(0, KV_HEADS_PAD)[:, None]
    km = kh < NUM_KV_HEADS
    slot = tl.load(slots_ptr + token).to(tl.int64)
    k_row = row + NUM_HEADS * 2 * HALF + kh * 2 * HALF + d
    a = tl.load(k_row, mask=km, other=0.0).to(tl.float32)
    b = tl.load(k_row + HALF, mask=km, other=0.0).to(tl.float32)
    k_out = k_cache_ptr + slot * stride_slot + kh * 2 * HALF + d
    tl.store(k_out, (a * cos - b * sin).to(k_cache_ptr.dtype.element_ty), mask=km)
    tl.store(k_out + HALF, (b * cos + a * sin).to(k_cache_ptr.dtype.element_ty), mask=km)
    v_row = k_row + NUM_KV_HEADS * 2 * HALF
    v_out = v_cache_ptr + slot * stride_slot + kh * 2 * HALF + d
    tl.store(v_out, tl.load(v_row, mask=km), mask=km)
    tl.store(v_out + HALF, tl.load(v_row + HALF, mask=km), mask=km)


def rope_write_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * dim]; cos/sin [tokens, 1, dim / 2]; caches [blocks, block_size,
    kv_heads, dim]; slots [tokens] flat cache indices. Returns the rotated Q as [tokens, heads, dim]."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, device=qkv.device, dtype=qkv.dtype)
    if t == 0:
        return q
    k_flat, v_flat = k_cache.view(-1, num_kv_heads, d), v_cache.view(-1, num_kv_heads, d)
    _rope_write_kv[(t,)](
        qkv,
        cos,
        sin,
        slots,
        q,
        k_flat,
        v_flat,
        qkv.stride(0),
        cos.stride(0),
        q.stride(0),
        k_flat.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=d // 2,
        num_warps=4,
    )
    return q


@triton.jit
def _add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, stride, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride + cols, s, mask=mask)
    s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride + cols, (s * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)`` for x, residual [tokens, hidden]."""
    t, n = x.shape
    out, res_out = torch.empty_like(x), torch.empty_like(residual)
    if t:
        block = triton.next_power_of_2(n)
        _add_rms_norm[(t,)](
            x, residual, weight, out, res_out, eps, x.stride(0), N=n, BLOCK=block, num_warps=min(16, block // 256)
        )
    return out, res_out


@triton.jit
def _silu_mul(gu_ptr, out_ptr, stride_gu, stride_out, FF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < FF
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + FF + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate_up [tokens, 2 * ff] holding gate then up."""
    t, ff = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, ff, device=gate_up.device, dtype=gate_up.dtype)
    if t:
        block = 1024
        _silu_mul[(t, triton.cdiv(ff, block))](gate_up, out, gate_up.stride(0), out.stride(0), FF=ff, BLOCK=block)
    return out
