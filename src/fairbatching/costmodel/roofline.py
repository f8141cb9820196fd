"""Analytic cost parameters from a GPU's roofline, used until measured profiles replace them.

Memory side: weights are read once per iteration, plus ``kv_bytes_per_token`` for every context token.
Compute side: ``2 * matmul_params`` FLOPs per new token, plus ``4 * layers * q_heads * head_dim`` FLOPs per
query-key pair of attention. Each side runs at an efficiency factor below peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairbatching.costmodel.model import CostParams


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2

    @property
    def matmul_params(self) -> int:
        """Parameters touched by matmuls per token: attention and MLP projections plus the LM head."""
        attn = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp) + self.hidden_size * self.vocab_size

    @property
    def total_params(self) -> int:
        return self.matmul_params + self.hidden_size * self.vocab_size

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        return 4 * self.num_layers * self.num_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    name: str
    peak_flops: float
    mem_bandwidth: float
    mem_bytes: float
    matmul_efficiency: float = 0.65
    attn_efficiency: float = 0.45
    bandwidth_efficiency: float = 0.80
    step_overhead_s: float = 0.8e-3
    per_seq_overhead_s: float = 4e-6


LLAMA3_8B = ModelShape(
    name="llama-3-8b",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)

H100_SXM = HardwareSpec(name="H100-SXM-80GB", peak_flops=989e12, mem_bandwidth=3.35e12, mem_bytes=80e9)

# Transition sharpness between memory- and compute-bound regimes; real GPUs overlap the two imperfectly.
ROOFLINE_P = 3.0


def roofline_params(model: ModelShape, hw: HardwareSpec) -> CostParams:
    """The cost model's coefficients for ``model`` on ``hw``, from the roofline (see the module doc)."""
    flops = hw.peak_flops
    bw = hw.mem_bandwidth * hw.bandwidth_efficiency
    return CostParams(
        t_fixed=hw.step_overhead_s,
        c_seq=hw.per_seq_overhead_s,
        t_weights=model.weight_bytes / bw,
        c_kv=model.kv_bytes_per_token / bw,
        c_tok=2 * model.matmul_params / (flops * hw.matmul_efficiency),
        c_attn=model.attn_flops_per_pair / (flops * hw.attn_efficiency),
        p=ROOFLINE_P,
    )
