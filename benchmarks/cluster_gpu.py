"""Cluster capacity on real GPUs: two engine replicas (one process per GPU) behind one router process, fed
trace windows on the wall clock, for each serving stack (policy + router + admission), beside the cluster
simulator on the same windows, profile and routing code.

Phase ``plan`` (CPU): the cluster simulator's capacity of every stack on every workload (mean SLO attainment
over the windows >= 90%), on the serving-calibrated H200 profile: where the GPU search starts. Phase ``run``
(the GPUs): ``engine.cluster.EngineCluster`` (the package's own multi-process driver: Ray's wheel does not
fit a device call) runs the ``--job``s in order: a search replays each stack at its simulated capacity,
then one step (1.15x) up or down, in rounds so that a time budget cuts every stack at the same depth; a
fixed job replays each stack at one load; every replay is one line of ``replays.jsonl``. Phase ``report``
(CPU): the GPU capacity of each stack (the crossing of 90%, linearly interpolated between its measured
points; a bracket bound where the points do not cross), the simulator's attainment at the same points,
P99 TTFT at the loads every stack was measured at, and repeated replays beside their first run.

  PYTHONPATH=src python3 benchmarks/cluster_gpu.py plan --out results/cluster-gpu
  PYTHONPATH=src python3 benchmarks/cluster_gpu.py run --plan results/cluster-gpu/plan.json --out $OUT
  PYTHONPATH=src python3 benchmarks/cluster_gpu.py report --out results/cluster-gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fairbatching.cluster.simulator import ClusterConfig, homogeneous, simulate_cluster
from fairbatching.core.request import SLO
from fairbatching.evaluation.capacity import bracket_search
from fairbatching.metrics.summary import summarize
from fairbatching.workloads.families import family

T0 = time.time()
PROFILE = "llama-3-8b-h200-engine"
TARGET = 0.9
WINDOWS = (1, 2)
STEP = 1.15
REPORT_INTERVAL = 0.1
NODES = 2


@dataclass(frozen=True)
class Stack:
    name: str
    policy: str
    router: str
    admission: str = "none"


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    slo: SLO
    requests: int


STACKS = (
    Stack("fairbatching+pab+reject", "fairbatching", "pab", "reject"),
    Stack("fairbatching+pab", "fairbatching", "pab"),
    Stack("fairbatching+least-outstanding", "fairbatching", "least-outstanding"),
    Stack("sarathi+least-outstanding", "sarathi", "least-outstanding"),
    Stack("vllm+round-robin", "vllm", "round-robin"),
)
SCENARIOS = (
    Scenario("azure-conv 2s/100ms", "azure-conv", SLO(2.0, 0.1), 300),
    # Every request carries its class's SLO; the default (the tight class) sizes Sarathi's token budget.
    Scenario("mixed-slo 0.5s/50ms+8s/200ms", "mixed-slo", SLO(0.5, 0.05), 300),
    Scenario("azure-code 2s/100ms", "azure-code", SLO(2.0, 0.1), 160),
)


def passes(slo: float) -> bool:
    """Attainment >= 90%, where a mean of window fractions (269/300 and 271/300) may sum just below 0.9."""
    return slo >= TARGET - 1e-9


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def config(stack: Stack, sc: Scenario) -> ClusterConfig:
    return ClusterConfig(
        homogeneous(NODES, stack.policy, PROFILE),
        sc.slo,
        router=stack.router,
        admission=stack.admission,
        report_interval=REPORT_INTERVAL,
    )


def fields(s) -> dict:
    return {
        "slo": s.slo_attainment,
        "ttft_p50": s.ttft.p50,
        "ttft_p99": s.ttft.p99,
        "tpot_mean": s.tpot.mean,
        "finished": s.finished,
        "requests": s.requests,
    }


def simulate(stack: Stack, sc: Scenario, qps: float, seed: int) -> dict:
    w = family(sc.workload).build(qps, seed, sc.requests)
    res = simulate_cluster(w, config(stack, sc))
    out = fields(summarize(stack.name, w.name, res.requests, res.end_time, res.busy_time, res.preemptions))
    return {**out, "end_s": res.end_time - min(s.arrival for s in w.requests)}


def sim_attainment(pool: ProcessPoolExecutor, stack: Stack, sc: Scenario, qps: float) -> float:
    return statistics.mean(f.result()["slo"] for f in [pool.submit(simulate, stack, sc, qps, s) for s in WINDOWS])


# --- plan ---------------------------------------------------------------------------------------------------
def plan(args) -> None:
    rows = []
    with ProcessPoolExecutor(args.cpus) as pool:
        for sc in SCENARIOS:
            for stack in STACKS:
                lo, hi = bracket_search(
                    lambda q, st=stack, sc=sc: passes(sim_attainment(pool, st, sc, q)), 8.0, 0.02, 24
                )
                est = [simulate(stack, sc, round(lo, 2), s)["end_s"] for s in WINDOWS]
                rows.append(
                    {"scenario": sc.name, "stack": stack.name, "sim_capacity_rps": round(lo, 2), "est_wall_s": sum(est)}
                )
                log(f"{sc.name:30s} {stack.name:32s} simulated capacity {lo:7.2f} req/s, ~{sum(est):.0f} s of replays")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps({"profile": PROFILE, "windows": WINDOWS, "rows": rows}, indent=2))


# --- run ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """``SCENARIO[@QPS][=STACK,...]``: bracket each stack's 90% crossing, or (with ``@QPS``) replay each stack
    at that one load, a point measured before too (tagged ``repeat``: run-to-run spread, not a new point)."""

    scenario: str
    stacks: tuple[str, ...]
    qps: float | None = None


def parse_job(text: str) -> Job:
    head, _, stacks = text.partition("=")
    name, at, qps = head.partition("@")
    known = {s.name for s in STACKS}
    chosen = tuple(stacks.split(",")) if stacks else tuple(s.name for s in STACKS)
    if name not in {s.name for s in SCENARIOS}:
        raise ValueError(f"--job {text!r}: unknown scenario {name!r}")
    if bad := [s for s in chosen if s not in known]:
        raise ValueError(f"--job {text!r}: unknown stack {bad[0]!r}")
    try:
        load = float(qps) if at else None
    except ValueError:
        raise ValueError(f"--job {text!r}: load {qps!r} is not a number") from None
    if load is not None and not load > 0:
        raise ValueError(f"--job {text!r}: load must be > 0, got {qps!r}")
    return Job(name, chosen, load)


def run(args) -> None:
    from fairbatching.engine.cluster import EngineCluster, EngineSpec

    plan_rows = {(r["scenario"], r["stack"]): r for r in json.loads(args.plan.read_text())["rows"]}
    stacks = {s.name: s for s in STACKS}
    scenarios = {s.name: s for s in SCENARIOS}
    jobs = args.job or [Job(sc.name, tuple(stacks)) for sc in SCENARIOS]
    earlier = [json.loads(line) for line in args.resume.read_text().splitlines()] if args.resume else []
    measured = {(r["scenario"], r["stack"], r["qps"], r["seed"]) for r in earlier}
    points: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in plan_rows}
    for key, qps in sorted({((r["scenario"], r["stack"]), r["qps"]) for r in earlier if not r.get("repeat")}):
        at = [r["gpu"]["slo"] for r in earlier if (r["scenario"], r["stack"]) == key and r["qps"] == qps]
        if key in points and len(at) == len(WINDOWS):
            points[key].append((qps, statistics.mean(at)))
    args.out.mkdir(parents=True, exist_ok=True)
    out = (args.out / "replays.jsonl").open("w")
    for r in earlier:
        out.write(json.dumps(r) + "\n")
    devices = [str(i) for i in range(NODES)] if not args.cpu else [None] * NODES
    engine = EngineSpec(
        args.model, max_context=16384, num_blocks=3000 if args.cpu else None, device="cpu" if args.cpu else None
    )
    deadline = T0 + args.budget_s
    with EngineCluster(engine, devices) as cluster:
        log(f"replicas ready: {cluster.kv_blocks} KV blocks, graphs captured at warm-up {cluster.graphs}")
        device = "cpu" if args.cpu else _device_name()

        def point(sc: Scenario, stack: Stack, qps: float, depth: int | None) -> bool:
            """Replay one load on every window; False (nothing run) once the time budget is spent."""
            if time.time() > deadline:
                return False
            slos, repeat = [], all((sc.name, stack.name, qps, seed) in measured for seed in WINDOWS)
            for seed in WINDOWS:
                w = family(sc.workload).build(qps, seed, 3 if args.cpu else sc.requests)
                start = time.time()
                res = cluster.replay(w, config(stack, sc), seed=seed)
                s = summarize(stack.name, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
                row = {
                    "scenario": sc.name,
                    "stack": stack.name,
                    "qps": qps,
                    "seed": seed,
                    "depth": depth,
                    **({"repeat": True} if repeat else {}),
                    "device": device,
                    "wall_s": time.time() - start,
                    "gpu": fields(s),
                    "refused": sum("admission control" in (q.finish_reason or "") for q in res.requests),
                    "per_node": res.per_node,
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                slos.append(s.slo_attainment)
            if not repeat:
                points[sc.name, stack.name].append((qps, statistics.mean(slos)))
            tag = " (repeat)" if repeat else ""
            log(f"{sc.name} / {stack.name} @ {qps}{tag}: GPU SLO {statistics.mean(slos):.3f} {slos}")
            return True

        for job in jobs:
            sc = scenarios[job.scenario]
            if job.qps is not None:
                loads = [(stacks[name], job.qps, None) for name in job.stacks]
            else:  # rounds: every stack one step deeper before any goes two
                loads = [(stacks[name], None, depth) for depth in range(args.max_points) for name in job.stacks]
            for stack, qps, depth in loads:
                key = (sc.name, stack.name)
                if qps is None:
                    qps = next_load(points[key], plan_rows[key]["sim_capacity_rps"])
                    if qps is None or len(points[key]) > depth:
                        continue
                if not point(sc, stack, qps, depth):
                    log("time budget spent: no more replays")
                    out.close()
                    return
    out.close()


def next_load(points: list[tuple[float, float]], seed_qps: float) -> float | None:
    """The next load to try: the simulator's capacity first, then one step beyond the highest pass (or
    below the lowest fail) until 90% is bracketed."""
    if not points:
        return round(seed_qps, 2)
    passed = [q for q, a in points if passes(a)]
    failed = [q for q, a in points if not passes(a)]
    if passed and failed:
        return None
    return round(max(passed) * STEP, 2) if passed else round(min(failed) / STEP, 2)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


# --- report -------------------------------------------------------------------------------------------------
def report(args) -> None:
    every = [json.loads(line) for line in (args.out / "replays.jsonl").read_text().splitlines()]
    reps = [r for r in every if not r.get("repeat")]
    stacks = {s.name: s for s in STACKS}
    scenarios = {s.name: s for s in SCENARIOS}
    plan_rows = {(r["scenario"], r["stack"]): r for r in json.loads((args.out / "plan.json").read_text())["rows"]}
    rows = []
    with ProcessPoolExecutor(args.cpus) as pool:
        for key in sorted({(r["scenario"], r["stack"]) for r in reps}):
            sc, stack = scenarios[key[0]], stacks[key[1]]
            mine = [r for r in reps if (r["scenario"], r["stack"]) == key]
            loads = sorted({r["qps"] for r in mine})
            curve = []
            for q in loads:
                at = [r for r in mine if r["qps"] == q]
                if len(at) < len(WINDOWS):
                    continue  # a load cut short by the time budget is not a point
                curve.append(
                    {
                        "qps": q,
                        "slo": statistics.mean(r["gpu"]["slo"] for r in at),
                        "ttft_p99": max(r["gpu"]["ttft_p99"] for r in at),
                        "sim_slo": sim_attainment(pool, stack, sc, q),
                    }
                )
            cap, bracket = crossing(curve)
            rows.append(
                {
                    "stack": stack.name,
                    "workload": sc.name,
                    "capacity_rps": cap,
                    "bracket": bracket,
                    "sim_capacity_rps": plan_rows[key]["sim_capacity_rps"],
                    "windows": len(WINDOWS),
                    "device": mine[0]["device"],
                    "points": curve,
                }
            )
    doc = {"rows": rows, "equal_load": equal_load(rows), "repeats": repeats(every)}
    (args.out / "cluster_capacity.json").write_text(json.dumps(doc, indent=2))
    for r in rows:
        log(f"{r['workload']:30s} {r['stack']:32s} GPU {r['capacity_rps']} {r['bracket']} sim {r['sim_capacity_rps']}")
    for e in doc["equal_load"]:
        log(
            f"{e['workload']} @ {e['qps']}: "
            + ", ".join(f"{k} {v['slo']:.3f} / {v['ttft_p99']:.2f} s" for k, v in e["stacks"].items())
        )
    for r in doc["repeats"]:
        log(
            f"repeat {r['workload']} / {r['stack']} @ {r['qps']} window {r['seed']}: "
            f"SLO {r['slo']}, step ms {r['step_ms']}"
        )


def equal_load(rows: list[dict]) -> list[dict]:
    """Every load at which all stacks of a workload were measured: attainment and P99 TTFT (worse window)."""
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        common = set.intersection(*({p["qps"] for p in r["points"]} for r in mine))
        for q in sorted(common):
            at = {r["stack"]: next(p for p in r["points"] if p["qps"] == q) for r in mine}
            out.append(
                {
                    "workload": workload,
                    "qps": q,
                    "stacks": {k: {"slo": p["slo"], "ttft_p99": p["ttft_p99"]} for k, p in at.items()},
                }
            )
    return out


def repeats(replays: list[dict]) -> list[dict]:
    """Each repeated replay beside the first of the same stack, load and window: attainment and mean step time
    (busy seconds per iteration over both replicas), [first, repeat]."""

    def step_ms(r: dict) -> float:
        return round(1e3 * sum(n["busy_s"] for n in r["per_node"]) / sum(n["iterations"] for n in r["per_node"]), 2)

    first = {(r["scenario"], r["stack"], r["qps"], r["seed"]): r for r in replays if not r.get("repeat")}
    out = []
    for r in (r for r in replays if r.get("repeat")):
        a = first[r["scenario"], r["stack"], r["qps"], r["seed"]]
        out.append(
            {
                "workload": r["scenario"],
                "stack": r["stack"],
                "qps": r["qps"],
                "seed": r["seed"],
                "slo": [a["gpu"]["slo"], r["gpu"]["slo"]],
                "ttft_p99": [a["gpu"]["ttft_p99"], r["gpu"]["ttft_p99"]],
                "step_ms": [step_ms(a), step_ms(r)],
            }
        )
    return out


def crossing(curve: list[dict]) -> tuple[float | None, list]:
    """Where attainment crosses the target: interpolated between the highest passing load and the lowest
    failing one above it; with no crossing, a one-sided bracket and no capacity."""
    passed = [p for p in curve if passes(p["slo"])]
    failed = [p for p in curve if not passes(p["slo"])]
    if not passed or not failed:
        lo = max((p["qps"] for p in passed), default=0.0)
        hi = min((p["qps"] for p in failed), default=None)
        return None, [lo, hi]
    a = max(passed, key=lambda p: p["qps"])
    above = [p for p in failed if p["qps"] > a["qps"]]
    if not above:
        return a["qps"], [a["qps"], a["qps"]]
    b = min(above, key=lambda p: p["qps"])
    frac = (a["slo"] - TARGET) / (a["slo"] - b["slo"])
    return round(a["qps"] + frac * (b["qps"] - a["qps"]), 2), [a["qps"], b["qps"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("plan", "run", "report"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plan", type=Path, help="plan.json (run)")
    ap.add_argument("--resume", type=Path, help="replays.jsonl of an earlier run: its load points are not rerun")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no replay load after this many seconds")
    ap.add_argument("--max-points", type=int, default=3)
    ap.add_argument(
        "--job",
        action="append",
        metavar="SCENARIO[@QPS][=STACK,...]",
        help="run: what to replay, in order (repeatable): bracket the 90%% crossing of each stack (all if none "
        "named), or with @QPS replay each at that load; default: bracket every stack on every scenario",
    )
    ap.add_argument("--cpu", action="store_true", help="plumbing check on CPU engines: tiny model, 3 requests")
    args = ap.parse_args()
    try:
        args.job = [parse_job(j) for j in args.job or []]
    except ValueError as exc:
        ap.error(str(exc))
    if args.phase == "run" and args.plan is None:
        ap.error("run needs --plan (plan.json from the plan phase)")
    if args.cpu:
        args.model = "tiny"
    {"plan": plan, "run": run, "report": report}[args.phase](args)
    log("done")


if __name__ == "__main__":
    main()
