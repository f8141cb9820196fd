"""Capacity on the GPU engine: each policy's highest request rate with >= 90% of requests meeting both SLOs,
found by real-time replays, seeded by the serving-calibrated simulator, on trace windows nobody tuned on.

Phase ``calibrate`` (one GPU measures): the profiling grid (grid profile), then one replay per policy of
the calibration window (the first requests of the Azure conversation trace), whose steps, each priced at
its period, refit the model: the serving-calibrated profile the policies plan with and the simulator
prices with. Phase ``search`` (every GPU, one engine per GPU, one replay per engine at a time): for each
scenario and policy, the simulator's capacity on that profile seeds a bracketing search (step 1.15x) whose
points are the mean SLO attainment of GPU replays of 3 trace windows (seeds 1-3: windows anywhere in the
trace, none of them the calibration window). Every replay is also simulated (same requests, same profile)
for the simulator-vs-GPU table. ``--resume`` takes the replays of an earlier pass, so a search longer than
one device command continues where it stopped.

  PYTHONPATH=src python3 benchmarks/gpu_capacity.py calibrate --out $OUT
  PYTHONPATH=src python3 benchmarks/gpu_capacity.py search --out $OUT \\
      --profile results/gpu-capacity/profile.json [--resume results/gpu-capacity/replays.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import Profile
from fairbatching.evaluation.capacity import bracket_search
from fairbatching.metrics.summary import summarize
from fairbatching.policies import make_policy
from fairbatching.runs import Experiment
from fairbatching.workloads.families import family

T0 = time.time()
POLICIES = ("fairbatching", "sarathi", "vllm")
TARGET = 0.9
WINDOWS = (1, 2, 3)


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    slo: SLO
    requests: int


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("azure-conv 2s/100ms", "azure-conv", SLO(2.0, 0.1), 150),
        Scenario("azure-conv 1s/50ms", "azure-conv", SLO(1.0, 0.05), 150),
        Scenario("azure-code 2s/100ms", "azure-code", SLO(2.0, 0.1), 80),
        # Every request carries its class's SLO; the default (the tight class) sizes Sarathi's token budget.
        Scenario("mixed-slo 0.5s/50ms+8s/200ms", "mixed-slo", SLO(0.5, 0.05), 150),
    )
}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# --- one engine per GPU process -------------------------------------------------------------------------
_RUNNER = None


def _start_worker(gpus, model: str, max_context: int) -> None:
    global _RUNNER
    gpu = gpus.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch

    from fairbatching.engine import build_engine

    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    _RUNNER = build_engine(model, max_context=max_context, kv_memory_fraction=0.8, num_blocks=None if cuda else 3000)
    _RUNNER.warmup()
    log(f"worker on GPU {gpu}: engine ready, {_RUNNER.pool.usable} KV blocks")


def _replay_task(sc: Scenario, policy: str, qps: float, seed: int, profile_json: dict, detail: bool = False) -> dict:
    from fairbatching.engine.loop import replay

    prof = Profile.from_json(profile_json)
    w = family(sc.workload).build(qps, seed, sc.requests)
    pol = make_policy(policy, prof.cost_model(), tpot_slo=sc.slo.tpot)
    res = replay(_RUNNER, pol, prof.cost_model(), w, sc.slo)
    s = summarize(policy, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
    factors = getattr(pol.cost_model, "factors", (1.0, 1.0))
    out = {
        **_summary_fields(s),
        "steps": res.iterations,
        "calibration_factors": list(factors),
        "window_start": w.meta.get("start"),
        "wall_s": res.end_time,
    }
    if detail:
        out["step_rows"] = res.step_rows
        out["log"] = {"start": res.log.start, "duration": res.log.duration, "running": res.log.running}
    return out


def _grid_task(every: int = 1) -> dict:
    from fairbatching.engine.profiler import default_grid, measured_profile, run_profile

    r = _RUNNER
    grid = default_grid(r.pool.usable * r.block_size, r.max_context)[::every]
    rows = run_profile(r, grid, repeats=5)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    prof, fit = measured_profile(
        r, rows, "grid", "benchmarks/gpu_capacity.py calibrate: the profiling grid", {"device": device}
    )
    return {"rows": rows, "profile": prof.to_json(), "fit": fit.as_dict(), "device": device}


def _summary_fields(s) -> dict:
    return {
        "slo": s.slo_attainment,
        "ttft_ok": s.ttft_attainment,
        "tpot_ok": s.tpot_attainment,
        "ttft_p50": s.ttft.p50,
        "ttft_p99": s.ttft.p99,
        "tpot_mean": s.tpot.mean,
        "finished": s.finished,
    }


def _simulate(sc: Scenario, policy: str, qps: float, seed: int, prof: Profile) -> dict:
    w = family(sc.workload).build(qps, seed, sc.requests)
    return _summary_fields(Experiment(w, prof, sc.slo, max_model_len=16384).run(policy).summary)


# --- phases -------------------------------------------------------------------------------------------------
class Runs:
    """The GPU workers (one engine each) and a pool of CPU processes for the simulator."""

    def __init__(self, gpus: ProcessPoolExecutor, cpus: ProcessPoolExecutor) -> None:
        self.gpus, self.cpus = gpus, cpus

    def sim_attainment(self, sc: Scenario, policy: str, qps: float, prof: Profile, seeds=WINDOWS) -> float:
        futures = [self.cpus.submit(_simulate, sc, policy, qps, s, prof) for s in seeds]
        return statistics.mean(f.result()["slo"] for f in futures)

    def sim_capacity(self, sc: Scenario, policy: str, prof: Profile, seeds=WINDOWS) -> float:
        lo, _ = bracket_search(lambda q: self.sim_attainment(sc, policy, q, prof, seeds) >= TARGET, 4.0, 0.03, 14)
        return lo


def calibrate(args, runs: Runs) -> Profile:
    """The grid profile, then the serving-calibrated one (saved under ``--out``)."""
    import numpy as np

    from fairbatching.costmodel.serving import serving_profile, serving_rows
    from fairbatching.engine.profiler import write_rows_csv

    log("grid profile")
    grid = runs.gpus.submit(_grid_task, 4 if args.dry_run else 1).result()
    write_rows_csv(args.out / "grid_rows.csv", grid["rows"])
    grid_prof = replace(Profile.from_json(grid["profile"]), source="measured")
    log(f"grid: {len(grid['rows'])} rows, held-out MAPE {grid['fit']['holdout_mape']:.3f}; {grid_prof.params}")
    base = SCENARIOS["azure-conv 2s/100ms"]
    calib = Scenario("calibration", base.workload, base.slo, 2 * base.requests)
    qps = round(0.85 * runs.sim_capacity(calib, "fairbatching", grid_prof, (0,)), 2)
    log(f"calibration replays: the first {calib.requests} Azure conversation requests at {qps} req/s")
    futures = [runs.gpus.submit(_replay_task, calib, p, qps, 0, grid_prof.to_json(), True) for p in POLICIES]
    rows = []
    for p, f in zip(POLICIES, futures, strict=True):
        r = f.result()
        log(f"calibration replay {p}: {r['steps']} steps, SLO {r['slo']:.3f}")
        rows.append(serving_rows(r["step_rows"], r["log"]["start"], r["log"]["duration"], r["log"]["running"]))
    steps = np.vstack(rows)
    gpu = "h200" if "H200" in grid["device"] else "h100"
    prof, fit = serving_profile(
        grid_prof,
        steps,
        f"llama-3-8b-{gpu}-engine",
        f"benchmarks/gpu_capacity.py calibrate: the grid, then one replay per policy of the first {calib.requests} "
        f"Azure conversation requests at {qps} req/s, each step priced at its period",
    )
    prof.save(args.out / "profile.json")
    grid_prof.save(args.out / "grid_profile.json")
    cols = ("new_tokens", "context_tokens", "num_seqs", "attn_work", "period")
    write_rows_csv(args.out / "calibration_steps.csv", [dict(zip(cols, map(float, r), strict=True)) for r in steps])
    log(f"serving-calibrated: {len(steps)} steps, held-out MAPE {fit.holdout_mape:.3f}; {prof.params}")
    return prof


def search(args, runs: Runs, prof: Profile) -> None:
    done: dict[tuple, dict] = {}
    if args.resume:
        for line in Path(args.resume).read_text().splitlines():
            r = json.loads(line)
            done[(r["scenario"], r["policy"], r["qps"], r["seed"])] = r
    out = (args.out / "replays.jsonl").open("w")
    for r in done.values():
        out.write(json.dumps(r) + "\n")
    lock = threading.Lock()
    deadline = T0 + args.budget_s
    results: list[dict] = []

    def run_pair(sc: Scenario, policy: str) -> None:
        knee = runs.sim_capacity(sc, policy, prof)
        log(f"{sc.name} / {policy}: simulated capacity {knee:.2f} req/s")
        points: list[dict] = []

        def meets(qps: float) -> bool:
            qps = round(qps, 2)
            keys = {seed: (sc.name, policy, qps, seed) for seed in WINDOWS}
            todo = [seed for seed in WINDOWS if keys[seed] not in done]
            if todo and time.time() > deadline:
                raise TimeoutError
            futures = {s: runs.gpus.submit(_replay_task, sc, policy, qps, s, prof.to_json()) for s in todo}
            sims = {s: runs.cpus.submit(_simulate, sc, policy, qps, s, prof) for s in todo}
            for seed in todo:
                g = futures[seed].result()
                row = {
                    "scenario": sc.name,
                    "policy": policy,
                    "qps": qps,
                    "seed": seed,
                    "window_start": g.pop("window_start"),
                    "gpu": g,
                    "sim": sims[seed].result(),
                }
                with lock:
                    done[keys[seed]] = row
                    out.write(json.dumps(row) + "\n")
                    out.flush()
            reps = [done[keys[s]] for s in WINDOWS]
            att = statistics.mean(r["gpu"]["slo"] for r in reps)
            sim = statistics.mean(r["sim"]["slo"] for r in reps)
            points.append({"qps": qps, "slo": att, "sim_slo": sim, "ttft_p99": max(r["gpu"]["ttft_p99"] for r in reps)})
            log(f"{sc.name} / {policy} @ {qps}: GPU SLO {att:.3f} (simulated {sim:.3f})")
            return att >= TARGET

        try:
            lo, hi = bracket_search(meets, knee, 0.08, args.max_points, step=1.15)
            complete = True
        except TimeoutError:
            lo = max((p["qps"] for p in points if p["slo"] >= TARGET), default=0.0)
            hi = min((p["qps"] for p in points if p["slo"] < TARGET), default=math.inf)
            complete = False
        with lock:
            results.append(
                {
                    "scenario": sc.name,
                    "policy": policy,
                    "capacity_rps": lo,
                    "bracket": [lo, hi],
                    "sim_capacity_rps": knee,
                    "windows": len(WINDOWS),
                    "points": sorted(points, key=lambda p: p["qps"]),
                    "complete": complete,
                }
            )

    names = [s for s in SCENARIOS if args.scenarios is None or s in args.scenarios.split(",")]
    threads = [threading.Thread(target=run_pair, args=(SCENARIOS[s], p)) for s in names for p in POLICIES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.close()
    device = prof.hardware.get("device", "unknown")
    (args.out / "capacity_pass.json").write_text(json.dumps({"device": device, "rows": results}, indent=2))
    for r in sorted(results, key=lambda r: (r["scenario"], r["policy"])):
        log(
            f"{r['scenario']:30s} {r['policy']:13s} capacity {r['capacity_rps']:.2f} bracket {r['bracket']} "
            f"simulated {r['sim_capacity_rps']:.2f}{'' if r['complete'] else ' (incomplete)'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("calibrate", "search", "all"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", type=Path, help="the profile to plan with (search); calibrate writes one")
    ap.add_argument("--resume", type=Path, help="replays.jsonl of an earlier pass: those replays are not rerun")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--cpus", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=500.0, help="start no replay after this many seconds")
    ap.add_argument("--max-points", type=int, default=4)
    ap.add_argument("--scenarios", default=None, help="comma-separated subset of scenario names")
    ap.add_argument("--dry-run", action="store_true", help="CPU check of the plumbing: tiny windows, a coarse grid")
    args = ap.parse_args()
    if args.dry_run:
        for name, sc in list(SCENARIOS.items()):
            SCENARIOS[name] = replace(sc, requests=3)
    args.out.mkdir(parents=True, exist_ok=True)
    import multiprocessing as mp

    n_gpus = args.gpus or _gpu_count()
    ctx = mp.get_context("spawn")
    gpu_ids = ctx.Manager().Queue()
    for i in range(n_gpus):
        gpu_ids.put(i)
    with (
        ProcessPoolExecutor(n_gpus, ctx, _start_worker, (gpu_ids, args.model, 16384)) as gpus,
        ProcessPoolExecutor(args.cpus, ctx) as cpus,
    ):
        runs = Runs(gpus, cpus)
        prof = calibrate(args, runs) if args.phase in ("calibrate", "all") else Profile.load(args.profile)
        if args.phase in ("search", "all"):
            search(args, runs, prof)
    log("done")


def _gpu_count() -> int:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
        return max(1, len(out.strip().splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return 1


if __name__ == "__main__":
    main()
