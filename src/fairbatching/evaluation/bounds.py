"""A clairvoyant upper bound on a node's capacity, from the same cost model.

A server that knows every output length, ignores latency, keeps the GPU busy 100% of the time and forms
the most efficient batches still has to do the workload's work. Compute: linear layers for every prompt
and output token, plus attention. Memory traffic: weights once per iteration, KV for every context token
each decode step reads. Decode steps of one request are sequential, so the number of iterations is at
least the total decode tokens over the widest decode batch the KV cache can hold. The busier of the two
resources sets the minimum GPU time T, and N / T requests per second is a rate no scheduler can sustain
for long. It bounds throughput, not SLO attainment, so real capacity at a 90% target lies below it.
"""

from __future__ import annotations

import numpy as np

from fairbatching.costmodel.model import attn_work
from fairbatching.costmodel.profile import Profile, load_profile
from fairbatching.runs import RunSpec
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload


def min_gpu_seconds(workload: Workload, profile: Profile, max_num_seqs: int = 256) -> float:
    p = profile.params
    prompts = np.array([r.prompt_len for r in workload.requests], dtype=float)
    outputs = np.array([r.output_len for r in workload.requests], dtype=float)
    decode_tokens = np.maximum(outputs - 1, 0)
    # Context read over a request's decode steps: sum_{k=1}^{L-1} (prompt + k).
    decode_ctx = decode_tokens * prompts + decode_tokens * (decode_tokens + 1) / 2
    prefill_attn = sum(attn_work(int(n), 0) for n in prompts)
    compute = p.c_tok * (prompts.sum() + decode_tokens.sum()) + p.c_attn * (prefill_attn + decode_ctx.sum())
    width = _decode_width(prompts, outputs, profile, max_num_seqs)
    iterations = max(decode_tokens.sum() / width, decode_tokens.max(initial=0))
    memory = p.t_weights * iterations + p.c_kv * decode_ctx.sum()
    overhead = p.t_fixed * iterations + p.c_seq * (decode_tokens.sum() + len(prompts))
    return float(max(compute, memory) + overhead)


def clairvoyant_capacity(workload: Workload, profile: Profile, max_num_seqs: int = 256) -> float:
    """Requests per second at which this workload's minimum GPU work fills the GPU completely."""
    return len(workload) / min_gpu_seconds(workload, profile, max_num_seqs)


def _decode_width(prompts: np.ndarray, outputs: np.ndarray, profile: Profile, max_num_seqs: int) -> int:
    """The widest decode batch the KV cache holds at the workload's mean resident length."""
    mean_resident = float(np.mean(prompts + outputs / 2))
    return max(1, min(max_num_seqs, int(profile.kv.capacity_tokens // max(mean_resident, 1))))


def chain_limited(workload: Workload, profile: Profile, max_num_seqs: int = 256) -> bool:
    """True when one request's sequential decode steps, not GPU throughput, set the minimum time: then
    N / T bounds how soon this finite workload can finish, not a rate that arrivals could sustain."""
    prompts = np.array([r.prompt_len for r in workload.requests], dtype=float)
    outputs = np.array([r.output_len for r in workload.requests], dtype=float)
    decode_tokens = np.maximum(outputs - 1, 0)
    width = _decode_width(prompts, outputs, profile, max_num_seqs)
    return bool(decode_tokens.max(initial=0) > decode_tokens.sum() / width)


def windows_capacity(windows: list[Workload], profile: Profile, max_num_seqs: int = 256) -> float | None:
    """The clairvoyant rate over exactly the windows a capacity search ran (all requests over all minimum GPU
    time), or None where a window is too short for the bound to be about throughput (``chain_limited``)."""
    if not windows or any(chain_limited(w, profile, max_num_seqs) for w in windows):
        return None
    return sum(len(w) for w in windows) / sum(min_gpu_seconds(w, profile, max_num_seqs) for w in windows)


def spec_bound(base: RunSpec, seeds: int) -> float | None:
    """The bound on the windows (seeds) a capacity search of ``base`` runs (from seed 1 on a real backend); None
    where they are too short."""
    from fairbatching.evaluation.capacity import search_windows

    fam = family(base.workload)
    windows = [fam.build(1.0, s, base.num_requests) for s in search_windows(base, seeds)]
    return windows_capacity(windows, load_profile(base.profile))
