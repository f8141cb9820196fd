"""The batch latency model.

An iteration is either bound by memory traffic (weights once, plus the KV cache it reads) or by compute
(linear layers per new token, plus attention work), with a smooth transition between the two regimes::

    t = t_fixed + c_seq * seqs + ((t_weights + c_kv * context)^p + (c_tok * new + c_attn * attn)^p)^(1/p)
        + t_mixed * [the batch carries prefill tokens]

``attn`` is the sum over sequences of ``n * (computed + (n + 1) / 2)``: the query-key pairs a chunk of
``n`` new tokens attends over its prior context (quadratic in chunk length, linear in context).
``p = 1`` is the plain additive linear model; large ``p`` approaches ``max(memory, compute)``.
``t_mixed`` is what a step pays for carrying any prefill at all: engines replay one whole-step CUDA graph
for decode-only batches but run attention eagerly between graph pieces once a prefill chunk joins (vLLM's
piecewise graphs; measured here on our engine, results/gpu-engine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from mypy_extensions import mypyc_attr

from fairbatching.errors import ProfileError


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True, slots=True)
class CostParams:
    t_fixed: float
    c_seq: float
    t_weights: float
    c_kv: float
    c_tok: float
    c_attn: float
    p: float = 1.0
    t_mixed: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0:
                raise ProfileError(f"cost parameter {name} must be finite and >= 0, got {value!r}")
        if self.p < 1:
            raise ProfileError(f"cost parameter p must be >= 1, got {self.p}")

    def as_array(self) -> np.ndarray:
        return np.array(list(asdict(self).values()), dtype=float)


@mypyc_attr(native_class=False)  # a plain class when compiled: frozen values pickle as usual
@dataclass(frozen=True, slots=True)
class BatchFeatures:
    """The aggregate shape of one batch; what profile rows record and the model prices."""

    new_tokens: int
    context_tokens: int
    num_seqs: int
    attn_work: float

    @staticmethod
    def of_chunks(chunks: list[tuple[int, int]]) -> BatchFeatures:
        """Features of a batch given ``(new_tokens, tokens_already_computed)`` per sequence."""
        return BatchFeatures(
            new_tokens=sum(n for n, _ in chunks),
            context_tokens=sum(n + c for n, c in chunks),
            num_seqs=len(chunks),
            attn_work=sum(attn_work(n, c) for n, c in chunks),
        )


def attn_work(new_tokens: int, computed: int) -> float:
    """Query-key pairs of a causal chunk of ``new_tokens`` over ``computed`` prior tokens."""
    return new_tokens * (computed + (new_tokens + 1) * 0.5)


class BatchPricer(Protocol):
    """Anything that prices a batch by its aggregate shape: a ``CostModel``, the ``AdaptiveCostModel`` that
    scales one by measured error, or the simulator's perturbed ``StepPricer``. Policies plan with one and
    the simulator prices executed steps with one."""

    @property
    def params(self) -> CostParams: ...

    def predict(self, new_tokens: float, context_tokens: float, num_seqs: int, attn: float) -> float: ...


class CostModel:
    """Prices batches. Hot path: ``predict`` is called many times per scheduling decision."""

    __slots__ = ("params", "_t_fixed", "_c_seq", "_t_w", "_c_kv", "_c_tok", "_c_attn", "_p", "_inv_p", "_t_mixed")

    def __init__(self, params: CostParams) -> None:
        self.params = params
        self._t_fixed, self._c_seq = params.t_fixed, params.c_seq
        self._t_w, self._c_kv = params.t_weights, params.c_kv
        self._c_tok, self._c_attn = params.c_tok, params.c_attn
        self._p, self._inv_p = params.p, 1.0 / params.p
        self._t_mixed = params.t_mixed

    def predict(self, new_tokens: float, context_tokens: float, num_seqs: int, attn: float) -> float:
        if num_seqs <= 0:
            return 0.0
        mem = self._t_w + self._c_kv * context_tokens
        comp = self._c_tok * new_tokens + self._c_attn * attn
        p = self._p
        core = mem + comp if p == 1.0 else (mem**p + comp**p) ** self._inv_p
        fixed = self._t_fixed + self._t_mixed if new_tokens > num_seqs else self._t_fixed
        return fixed + self._c_seq * num_seqs + core

    def predict_decodes(self, num_seqs: int, context: np.ndarray) -> np.ndarray:
        """``predict(n, c, n, c)`` for decode-only steps of ``num_seqs`` sequences at each context ``c``.

        The same operations in the same order as ``predict``, so the same bits; for ``p != 1`` the power is
        taken per element in Python, since NumPy's vectorised ``power`` may round differently from libm.
        """
        mem = self._t_w + self._c_kv * context
        comp = self._c_tok * num_seqs + self._c_attn * context
        p = self._p
        if p == 1.0:
            core = mem + comp
        else:
            inv = self._inv_p
            core = np.array([(m**p + c**p) ** inv for m, c in zip(mem.tolist(), comp.tolist(), strict=True)])
        return self._t_fixed + self._c_seq * num_seqs + core


def predict_with(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Model output for parameter vector ``theta`` (CostParams order) on feature rows ``x``."""
    t_fixed, c_seq, t_w, c_kv, c_tok, c_attn, p, t_mixed = theta
    mem = t_w + c_kv * x[:, 1]
    comp = c_tok * x[:, 0] + c_attn * x[:, 3]
    return t_fixed + t_mixed * (x[:, 0] > x[:, 2]) + c_seq * x[:, 2] + (mem**p + comp**p) ** (1.0 / p)
