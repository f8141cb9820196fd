"""The GPU engine on the device, in one command: correctness, speed against the hardware floor, a measured
profile, and the simulator checked against real replays.

1. ceilings: copy bandwidth and bf16 matmul rate, measured now (the floors below use them)
2. correctness: the CUDA attention path (Triton paged decode + FlashAttention varlen) against the SDPA
   reference on Llama-3-8B head shapes, and greedy tokens of both backends on a small model
3. speed: decode-only steps (batch 64-256, context 1-4k) against (weights + KV bytes) / copy bandwidth,
   prefill-only steps (2-8k tokens) against FLOPs / matmul rate
   mixed_speed: mixed steps on the engine's attention routing against varlen for every chunk;
   step_sizes: mixed steps at every size up to the largest graph, beside their matmuls alone
4. profile: `fairbatching profile`'s grid on the engine, fitted, held-out error (rows.csv, profile.json)
5. validation: the first N requests of a trace at 4 loads (0.5-1.1x the simulated knee), fairbatching and
   sarathi, replayed on the engine on the wall clock and simulated with the profile just measured ("sim")
   and with a model fitted on the steps of a replay of the next N requests ("simcal"; calibration_steps.csv)

Run on the device (trace copied beside the tree, carried as device-data/):
  PYTHONPATH=src python3 benchmarks/gpu_engine.py --out $OUT --trace device-data/AzureLLMInferenceTrace_conv.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from fairbatching.core.request import SLO
from fairbatching.costmodel.fit import fit_cost_model
from fairbatching.costmodel.model import BatchFeatures
from fairbatching.costmodel.serving import step_periods
from fairbatching.engine import build_engine
from fairbatching.engine.attention import PREFILL_IMPLS, ROUTES, PrefillRouting, attention, build_metadata
from fairbatching.engine.graph_sizes import linear_layer_times
from fairbatching.engine.loop import generate, replay
from fairbatching.engine.profiler import (
    default_grid,
    measured_profile,
    run_profile,
    time_composition,
    write_rows_csv,
)
from fairbatching.engine.timing import cuda_time
from fairbatching.metrics.summary import summarize
from fairbatching.policies import make_policy
from fairbatching.serving.node import NodeConfig
from fairbatching.serving.simulator import simulate
from fairbatching.workloads.traces import load_trace

T0 = time.time()
SUMMARY_COLUMNS = {
    "ttft_p50": lambda s: s.ttft.p50,
    "ttft_p99": lambda s: s.ttft.p99,
    "tpot_mean": lambda s: s.tpot.mean,
    "slo_attainment": lambda s: s.slo_attainment,
}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def ceilings() -> dict:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy = cuda_time(lambda: b.copy_(a))
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = cuda_time(lambda: m @ m)
    return {"copy_bytes_per_s": 2 * n / copy, "bf16_matmul_flops": 2 * 8192**3 / mm}


def check_attention() -> dict:
    """CUDA path vs SDPA reference, bf16, Llama-3-8B heads: decodes of several lengths plus prefill chunks."""
    torch.manual_seed(0)
    bs, nkv, nh, d = 16, 8, 32, 128
    k_cache = torch.randn(800, bs, nkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(800, bs, nkv, d, device="cuda", dtype=torch.bfloat16)
    chunks, next_block = [], 1
    # (tokens cached, new tokens): four decodes, then prefill chunks with and without prior context
    for c, n in [(1, 1), (16, 1), (999, 1), (2999, 1), (0, 64), (200, 300), (2500, 20), (0, 1500), (1000, 700)]:
        blocks = list(range(next_block, next_block + -(-(n + c) // bs)))[::-1]
        next_block += len(blocks)
        chunks.append((c, n, blocks))
    num_decodes = 4
    q = torch.randn(sum(n for _c, n, _b in chunks), nh, d, device="cuda", dtype=torch.bfloat16)
    dev = torch.device("cuda")
    ref = attention(
        q.float(), k_cache.float(), v_cache.float(), build_metadata("reference", chunks, num_decodes, bs, dev)
    )
    out = {"ref_abs_mean": ref.abs().mean().item()}
    for impl in PREFILL_IMPLS:
        routing = PrefillRouting(impl)
        # pack the prefill chunks in the order their kernels expect, as the runner does
        order = list(range(num_decodes)) + sorted(
            range(num_decodes, len(chunks)), key=lambda i: ROUTES.index(routing.route(*chunks[i][:2]))
        )
        starts = np.cumsum([0] + [n for _c, n, _b in chunks])
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(dev)
        meta = build_metadata("cuda", [chunks[i] for i in order], num_decodes, bs, dev, 1024, routing)
        err = (attention(q[rows], k_cache, v_cache, meta).float() - ref[rows]).abs()
        out[impl] = {"max_abs_error": err.max().item(), "mean_abs_error": err.mean().item()}
        log(f"attention check ({impl} prefill): max abs error {err.max().item():.4f}")
    return out


def check_tokens() -> dict:
    """Greedy tokens, CUDA backend vs reference backend, same bf16 weights (Llama-3.2-1B shape, 4 layers).
    bf16 rounding differs between the paths, so a near-tie may flip a token; most must agree."""
    torch.manual_seed(0)
    prompts = [[int(t) for t in torch.randint(0, 128256, (n,))] for n in (7, 100, 900, 2000, 33)]
    out = {}
    cost = None
    from fairbatching.costmodel.profile import load_profile

    cost = load_profile().cost_model()
    for backend in ("cuda", "reference"):
        runner = build_engine("llama-3.2-1b@4", dtype="bfloat16", num_blocks=2000, max_context=4096, warmup=False)
        if backend == "reference":
            runner.backend, runner.graph_batch_sizes = "reference", ()
        pol = make_policy("sarathi", cost, token_budget=256)
        out[backend] = generate(runner, pol, cost, prompts, 16).tokens
        del runner
        torch.cuda.empty_cache()
    pairs = list(zip(out["cuda"], out["reference"], strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None) for x, y in pairs]
    return {"tokens": 16 * len(prompts), "identical": same, "first_divergence_per_prompt": first_diff}


def prefill_breakdown(runner) -> list[dict]:
    """Where an 8k-token prefill step spends GPU time, by kernel (torch.profiler)."""
    import random

    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(0)
    time_composition(runner, [(8192, 0)], 1, rng)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_composition(runner, [(8192, 0)], 1, rng)
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:12]
    total = sum(e.device_time_total for e in prof.key_averages())
    rows = [
        {"kernel": e.key[:90], "ms": e.device_time_total / 1e3 / 2, "share": e.device_time_total / total}
        for e in events
    ]
    for r in rows:
        log(f"prefill kernel {r['share'] * 100:5.1f}% {r['ms']:7.2f} ms  {r['kernel']}")
    return rows


@contextlib.contextmanager
def engine_variant(runner, prefill_attention: str, kernels):
    """Run the engine with another prefill attention and fused-kernel setting, restored afterwards even when a
    measurement fails (a failed one must not leave later sections on the variant)."""
    chosen = (runner.prefill_attention, runner.model.kernels)
    runner.prefill_attention, runner.model.kernels = prefill_attention, kernels
    try:
        yield
    finally:
        runner.prefill_attention, runner.model.kernels = chosen


def speed_table(runner, ceil: dict) -> list[dict]:
    c = runner.model.config
    weights = sum(t.numel() * t.element_size() for t in _tensors(runner.model))
    kv_token = c.kv_bytes_per_token
    linear_params = c.num_layers * (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    rows = []
    import random

    rng = random.Random(0)
    capacity = runner.pool.usable * runner.block_size
    for seqs in (64, 128, 256):
        for ctx in (1024, 2048, 4096):
            if seqs * (ctx + 1) > capacity:
                continue
            t = time_composition(runner, [(1, ctx)] * seqs, 10, rng)
            floor = (weights + seqs * (ctx + 1) * kv_token) / ceil["copy_bytes_per_s"]
            rows.append({"kind": "decode", "seqs": seqs, "context": ctx, "ms": t * 1e3, "floor_ms": floor * 1e3})
    # Prefill under every attention implementation, with and without the fused kernels (same run, same GPU).
    chosen = (runner.prefill_attention, runner.model.kernels)
    variants = [(impl, kernels) for impl in ("varlen", "cudnn") for kernels in (None, chosen[1])]
    for n in (2048, 4096, 8192):
        attn = 4 * c.num_layers * c.num_heads * c.head_dim * BatchFeatures.of_chunks([(n, 0)]).attn_work
        flops = 2 * linear_params * n + 2 * c.hidden_size * c.vocab_size + attn
        floor = flops / ceil["bf16_matmul_flops"]
        for impl, kernels in variants:
            with engine_variant(runner, impl, kernels):
                t = time_composition(runner, [(n, 0)], 5, rng)
            rows.append(
                {
                    "kind": "prefill",
                    "seqs": 1,
                    "context": n,
                    "ms": t * 1e3,
                    "floor_ms": floor * 1e3,
                    "attention": impl,
                    "fused": kernels is not None,
                    "engine_default": kernels is chosen[1]
                    and impl == PrefillRouting(chosen[0], runner.cudnn_wins).route(0, n),
                }
            )
    for r in rows:
        r["ratio"] = r["ms"] / r["floor_ms"]
        variant = f" {r['attention']:6s} fused={r['fused']!s:5s}" if r["kind"] == "prefill" else ""
        log(
            f"speed {r['kind']:7s} seqs={r['seqs']:3d} ctx={r['context']:5d} {r['ms']:8.2f} ms "
            f"floor {r['floor_ms']:8.2f} x{r['ratio']:.2f}{variant}"
        )
    return rows


def mixed_speed(runner) -> list[dict]:
    """Mixed steps on the engine's attention routing against FlashAttention-2 varlen for every chunk (the
    engine before the Triton chunk kernel and whole-step mixed graphs), same run, same compositions."""
    import random

    rng = random.Random(0)
    chosen = runner.prefill_attention
    comps = {
        "16 decodes@2k + 64 over 3k": [(1, 2048)] * 16 + [(64, 3000)],
        "16 decodes@2k + 64 fresh": [(1, 2048)] * 16 + [(64, 0)],
        "64 decodes@1k + 256 over 3k": [(1, 1024)] * 64 + [(256, 3000)],
        "160 decodes@2k + 256 fresh": [(1, 2048)] * 160 + [(256, 0)],
        "48 decodes@1.5k + 4 x 128 over 1k": [(1, 1500)] * 48 + [(128, 1000)] * 4,
        "1 x 32 over 4k": [(32, 4096)],
        "1 x 512 over 8k": [(512, 8192)],
    }
    rows = []
    for name, comp in comps.items():
        row = {"composition": name}
        for impl in ("varlen", chosen):
            with engine_variant(runner, impl, runner.model.kernels):
                row[f"{impl}_ms"] = time_composition(runner, comp, 10, rng) * 1e3
        row["speedup"] = row["varlen_ms"] / row[f"{chosen}_ms"]
        rows.append(row)
        log(
            f"mixed {name:34s} varlen {row['varlen_ms']:7.2f} ms  {chosen} {row[f'{chosen}_ms']:7.2f} ms"
            f"  x{row['speedup']:.2f}"
        )
    return rows


def step_sizes(runner) -> list[dict]:
    """Mixed steps of every size up to the largest graph (8 decodes at 2k + one chunk, fresh or over 2k of
    context), each as the engine runs it (padded to the next graph size it kept), beside the GPU time of the
    step's matmuls alone at exactly that many tokens: where step time jumps between neighbouring sizes, and
    whether the matmuls make the jump."""
    import random

    rng = random.Random(0)
    c = runner.model.config
    sizes = range(64, runner.piecewise_token_sizes[-1] + 1, 64)
    linear = linear_layer_times(runner.model.layers[0], sizes)
    log(f"graph sizes kept at warm-up: {runner.piecewise_token_sizes}")
    rows = []
    for n in sizes:
        row = {
            "tokens": n,
            "graph_tokens": next(t for t in runner.piecewise_token_sizes if t >= n),
            "linear_ms": linear[n] * c.num_layers * 1e3,
        }
        for name, ctx in (("fresh", 0), ("over_2k", 2048)):
            row[f"{name}_route"] = runner.routing.route(ctx, n - 8)
            row[f"{name}_ms"] = time_composition(runner, [(1, 2048)] * 8 + [(n - 8, ctx)], 10, rng) * 1e3
        rows.append(row)
        log(
            f"step {n:5d} tokens (graph {row['graph_tokens']:5d}): linear {row['linear_ms']:6.2f} ms | "
            f"fresh {row['fresh_ms']:6.2f} ms ({row['fresh_route']}) | over 2k {row['over_2k_ms']:6.2f} ms "
            f"({row['over_2k_route']})"
        )
    return rows


def _tensors(model):
    yield model.embed
    if not model.config.tie_word_embeddings:
        yield model.lm_head
    yield model.final_norm
    for w in model.layers:
        yield from (w.qkv, w.o, w.gate_up, w.down, w.input_norm, w.post_attention_norm)


def validate(
    runner,
    prof,
    trace: Path,
    n: int,
    slo: SLO,
    budget_s: float,
    out: Path,
    load_factors: tuple[float, ...] = (0.5, 0.7, 0.85, 1.1),
    plan_calibrated: bool = False,
    dump_load: int | None = None,
    repeats: int = 1,
) -> list[dict]:
    cost = prof.cost_model()
    full = load_trace(trace)
    base = full.head(n)
    sim_cfg = NodeConfig(slo, prof.kv, max_model_len=runner.max_context)

    def sim(policy: str, qps: float, step_cost=cost, plan_cost=cost, raw: bool = False):
        """The policy plans with ``plan_cost`` (as on the GPU); ``step_cost`` prices the steps."""
        w = base.rescaled(qps)
        res = simulate(make_policy(policy, plan_cost, tpot_slo=slo.tpot), step_cost, w, sim_cfg)
        summary = summarize(policy, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
        return (summary, res) if raw else summary

    # The knee: highest rate (coarse grid) where simulated fairbatching keeps 90% SLO attainment.
    knee = 1.0
    for qps in [1.0 * 1.15**i for i in range(40)]:
        if sim("fairbatching", qps).slo_attainment < 0.9:
            break
        knee = qps
    loads = [round(knee * f, 2) for f in load_factors]
    log(f"validation: simulated fairbatching knee {knee:.2f} req/s; loads {loads}")
    # Calibration: the steps of one replay of a different trace window (the next N requests, middle load),
    # each priced at its period (the step and the loop's host work up to the next one), so the simulator's
    # clock runs as the engine's loop does. Grid rows left out and relative error rather than absolute: why,
    # measured, in results/gpu-engine/README.md (fixed-sizes-rerun, absolute-calibration, calibration_choice).
    calib = replay(
        runner,
        make_policy("fairbatching", cost, tpot_slo=slo.tpot),
        cost,
        full.head(n, n).rescaled(loads[len(loads) // 2]),
        slo,
    )
    calib_rows = np.asarray(calib.step_rows)
    calib_rows[:, 4] = _periods(calib.log)
    fit = fit_cost_model(calib_rows)
    calibrated = fit.model
    write_rows_csv(out / "calibration_steps.csv", _step_rows(calib, {"grid": cost, "calibrated": calibrated}))
    log(
        f"calibrated on {len(calib.step_rows)} serving steps: held-out MAPE {fit.holdout_mape:.4f}; {calibrated.params}"
    )
    rows = []
    planners = [("grid", cost)] + ([("calibrated", calibrated)] if plan_calibrated else [])
    runs = [(q, p, name, c) for q in loads for name, c in planners for p in ("fairbatching", "sarathi")]
    for qps, policy, planner, plan_cost in runs:
        if time.time() - T0 > budget_s:
            log(f"time budget reached: skipping {policy} @ {qps} ({planner} planner)")
            continue
        w = base.rescaled(qps)
        replays = []
        for _ in range(repeats):  # the same replay again: how far the GPU differs from itself
            r = replay(runner, make_policy(policy, plan_cost, tpot_slo=slo.tpot), plan_cost, w, slo)
            replays.append((r, summarize(policy, w.name, r.requests, r.end_time, r.busy_time, r.preemptions)))
        res, gpu = replays[0]
        s = sim(policy, qps, plan_cost=plan_cost)
        s_cal, res_cal = sim(policy, qps, calibrated, plan_cost=plan_cost, raw=True)
        if dump_load is not None and qps == loads[dump_load]:
            _dump(out, policy, res, res_cal, cost, calibrated)
        row = {"qps": qps, "policy": policy, "planner": planner}
        for tag, summ in (("gpu", gpu), ("sim", s), ("simcal", s_cal)):
            row.update({f"{tag}_{key}": get(summ) for key, get in SUMMARY_COLUMNS.items()})
            row[f"{tag}_finished"] = summ.finished
        if repeats > 1:  # GPU columns: median over the repeats, with their range
            for key, get in SUMMARY_COLUMNS.items():
                values = [get(g) for _r, g in replays]
                row[f"gpu_{key}"] = statistics.median(values)
                row[f"gpu_{key}_min"], row[f"gpu_{key}_max"] = min(values), max(values)
            log(
                f"{policy} @ {qps}: {repeats} GPU replays, TTFT p50 {row['gpu_ttft_p50_min']:.3f}-"
                f"{row['gpu_ttft_p50_max']:.3f}, p99 {row['gpu_ttft_p99_min']:.3f}-{row['gpu_ttft_p99_max']:.3f}, "
                f"TPOT {row['gpu_tpot_mean_min'] * 1e3:.1f}-{row['gpu_tpot_mean_max'] * 1e3:.1f} ms"
            )
        row["gpu_preemptions"] = res.preemptions
        row["gpu_host_gap_s"] = _host_gaps(res.log)
        row["gpu_busy_s"] = res.busy_time
        steps = np.asarray(res.step_rows)
        ratio = np.array([cost.predict(*r[:4]) for r in steps]) / steps[:, 4]
        row["gpu_steps"] = len(steps)
        row["cost_model_mape_on_steps"] = float(np.mean(np.abs(ratio - 1)))
        row["cost_model_bias_on_steps"] = _bias(ratio, steps[:, 4])
        decode_only = steps[:, 0] == steps[:, 2]
        row["decode_only_steps"] = int(decode_only.sum())
        row["cost_model_bias_decode_steps"] = _bias(ratio[decode_only], steps[decode_only, 4])
        row["cost_model_bias_mixed_steps"] = _bias(ratio[~decode_only], steps[~decode_only, 4])
        rows.append(row)
        log(
            f"{policy:12s} @ {qps:6.2f} ({planner} planner): "
            f"TTFT p50 gpu {row['gpu_ttft_p50']:.3f} sim {row['sim_ttft_p50']:.3f} | "
            f"p99 gpu {row['gpu_ttft_p99']:.3f} sim {row['sim_ttft_p99']:.3f} | "
            f"TPOT gpu {row['gpu_tpot_mean'] * 1e3:.1f} sim {row['sim_tpot_mean'] * 1e3:.1f} ms | "
            f"SLO gpu {row['gpu_slo_attainment']:.3f} sim {row['sim_slo_attainment']:.3f} | "
            f"calibrated sim: TTFT p50 {row['simcal_ttft_p50']:.3f} p99 {row['simcal_ttft_p99']:.3f} "
            f"TPOT {row['simcal_tpot_mean'] * 1e3:.1f} ms SLO {row['simcal_slo_attainment']:.3f} | "
            f"cost model on {len(steps)} steps: MAPE {row['cost_model_mape_on_steps']:.3f} "
            f"bias {row['cost_model_bias_on_steps']:+.3f} (decode-only {row['cost_model_bias_decode_steps']:+.3f}, "
            f"with prefill {row['cost_model_bias_mixed_steps']:+.3f})"
        )
        write_rows_csv(out / "validation.csv", rows)
    return rows


def _periods(log) -> np.ndarray:
    return step_periods(log.start, log.duration, log.running)


def _host_gaps(log) -> float:
    """Seconds between consecutive steps while requests were running: loop time outside the steps."""
    return float((_periods(log) - np.asarray(log.duration)).sum())


def _step_rows(res, models: dict) -> list[dict]:
    """A replay's steps: the cost model's features, measured seconds and period, each model's prediction."""
    log, steps, period = res.log, np.asarray(res.step_rows), _periods(res.log)
    return [
        {
            "start": log.start[i],
            "new_tokens": int(steps[i, 0]),
            "context_tokens": int(steps[i, 1]),
            "num_seqs": int(steps[i, 2]),
            "attn_work": steps[i, 3],
            "seconds": steps[i, 4],
            "period": period[i],
            "prefill_tokens": log.prefill_tokens[i],
            "decode_seqs": log.decode_seqs[i],
            "running": log.running[i],
            "waiting": log.waiting[i],
            **{f"{name}_predicted": m.predict(*steps[i, :4]) for name, m in models.items()},
        }
        for i in range(len(steps))
    ]


def _dump(out: Path, policy: str, gpu, simcal, cost, calibrated) -> None:
    """Step log and per-request latencies of one GPU replay beside its calibrated simulation (diagnosis)."""
    write_rows_csv(out / f"steps_{policy}.csv", _step_rows(gpu, {"grid": cost, "calibrated": calibrated}))
    sim_by_id = {r.request_id: r for r in simcal.requests}
    reqs = []
    for r in gpu.requests:
        s = sim_by_id.get(r.request_id)
        if not r.token_times or s is None or not s.token_times:
            continue
        reqs.append(
            {
                "request_id": r.request_id,
                "arrival": r.arrival,
                "prompt_len": r.prompt_len,
                "gpu_ttft": r.token_times[0] - r.arrival,
                "simcal_ttft": s.token_times[0] - s.arrival,
                "gpu_last": r.token_times[-1] - r.arrival,
                "simcal_last": s.token_times[-1] - s.arrival,
            }
        )
    write_rows_csv(out / f"requests_{policy}.csv", reqs)


def _bias(ratio: np.ndarray, seconds: np.ndarray) -> float:
    """Predicted over measured time of a set of steps, minus one (negative: the model under-predicts)."""
    return float(np.sum(ratio * seconds) / np.sum(seconds) - 1) if len(seconds) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.1)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting replays after this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--load-factors", default="0.5,0.7,0.85,1.1", help="validation loads, as fractions of the knee")
    ap.add_argument(
        "--plan-calibrated", action="store_true", help="also replay with policies planning on the calibrated model"
    )
    ap.add_argument("--replays", type=int, default=1, help="GPU replays per load and policy (their median)")
    ap.add_argument("--dump-load", type=int, default=None, help="index of the load whose steps/requests to dump")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    cuda = torch.cuda.is_available()
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    report["model"] = args.model
    torch.backends.cuda.matmul.allow_tf32 = False

    def section(name, fn):
        if name in skip:
            return None
        log(f"== {name}")
        try:
            value = fn()
            report[name] = value
            return value
        except Exception as exc:
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            return None
        finally:
            (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))

    if not cuda:  # a dry run of the profile and validation sections on the CPU (tiny model)
        skip |= {"ceilings", "attention_check", "token_check", "speed", "prefill_breakdown", "step_sizes"}
    ceil = section("ceilings", ceilings)
    section("attention_check", check_attention)
    section("token_check", check_tokens)
    log("building the engine")
    runner = build_engine(args.model, max_context=16384, kv_memory_fraction=0.8, num_blocks=None if cuda else 4000)
    report["kv_blocks"] = runner.pool.usable
    runner.warmup()
    report["graph_sizes"] = {"kept": runner.piecewise_token_sizes, "linear_s": runner.linear_times}
    log(f"engine ready: {runner.pool.usable} KV blocks of {runner.block_size}")
    section("speed", lambda: speed_table(runner, ceil))
    section("mixed_speed", lambda: mixed_speed(runner))
    section("step_sizes", lambda: step_sizes(runner))
    section("prefill_breakdown", lambda: prefill_breakdown(runner))

    def profile():
        from dataclasses import asdict

        grid = default_grid(runner.pool.usable * runner.block_size, runner.max_context)
        if not cuda:
            grid = grid[::5]
        rows = run_profile(runner, grid, repeats=5, progress=lambda i, n, r: i % 10 == 0 and log(f"profile {i}/{n}"))
        write_rows_csv(args.out / "rows.csv", rows)
        prof, fit = measured_profile(
            runner,
            rows,
            f"{args.model}-h100-engine",
            "benchmarks/gpu_engine.py: fairbatching engine, bf16, random weights, CUDA graphs for decode",
            {"device": report["device"]},
        )
        prof.save(args.out / "profile.json")
        log(f"profile: {len(rows)} rows, held-out MAPE {fit.holdout_mape:.4f} max {fit.holdout_max_error:.4f}")
        return {"rows": len(rows), **fit.as_dict(), "params": asdict(prof.params)}

    section("profile", profile)
    if (args.out / "profile.json").exists():
        from fairbatching.costmodel.profile import Profile

        prof = Profile.load(args.out / "profile.json")
        section(
            "validation",
            lambda: validate(
                runner,
                prof,
                args.trace,
                args.requests,
                SLO(args.ttft_slo, args.tpot_slo),
                args.budget_s,
                args.out,
                tuple(float(f) for f in args.load_factors.split(",")),
                args.plan_calibrated,
                args.dump_load,
                args.replays,
            ),
        )
    report["seconds"] = time.time() - T0
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log("done")
    if any(isinstance(v, dict) and "error" in v for v in report.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
