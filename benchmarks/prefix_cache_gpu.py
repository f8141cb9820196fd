"""Prefix caching on one GPU (issue 29's single-node numbers): FairBatching and vLLM's policy, each with and
without ``--prefix-caching``, on a multi-turn chat window (250 requests at 18.6 req/s, 2 s / 100 ms) and a
Mooncake conversation window (40 requests at 4.0 req/s, 10 s / 100 ms; requests past the engine's context
dropped first, so every policy can serve every request).

Every replay goes through the run layer's GPU backend (``runs.Experiment`` with ``engines``: one engine replica
built and warmed once, the same path as ``compare --backend gpu --prefix-caching``), planning on the bundled
``llama-3-8b-h200-engine`` profile, with the simulator's prediction of the same run beside it. Each replay is
one ``runs/<scenario>-<policy>[-cache].json`` in ``--out`` as soon as it ends, and ``summary.csv`` (hit rate,
SLO attainment, P99 TTFT, P99 TBT, measured and simulated) is rewritten after each; a replay already in
``--out`` is not run again, and none starts that would end past ``--budget-s`` (engine build included), so a
cut run continues where it stopped.

  PYTHONPATH=src python3 benchmarks/prefix_cache_gpu.py --out $OUT/prefix-cache              # one H200, ~290 s
  PYTHONPATH=src python3 benchmarks/prefix_cache_gpu.py --out /tmp/pc --tiny   # plumbing, on a CPU (tiny model)

Without a CUDA GPU (and without ``--tiny``) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fairbatching.core.backend import EngineSpec
from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.runs import Experiment, RunResult
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload

T0 = time.time()
PROFILE = "llama-3-8b-h200-engine"
MAX_CONTEXT = 16384
POLICIES = ("fairbatching", "vllm")
ENGINE_START_S = 40.0  # building, warming and sizing the engine (gpu_tail measured 21 s on an H200)
REPLAY_OVERHEAD_S = 3.0  # per replay beyond its simulated span: prompts drawn, requests set up, drain slack
TINY_REQUESTS = 6
COLUMNS = (
    "run",
    "scenario",
    "policy",
    "prefix_caching",
    "qps",
    "requests",
    "finished",
    "prefix_hit_rate",
    "slo_attainment",
    "ttft_p99",
    "tbt_p99",
    "sim_prefix_hit_rate",
    "sim_slo_attainment",
    "sim_ttft_p99",
    "sim_tbt_p99",
    "wall_s",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    requests: int
    qps: float
    slo: SLO

    def build(self, tiny: bool) -> Workload:
        """The window (seed 0): its first ``requests`` that fit the engine's context; ``tiny``: the first few cut
        to a few tokens, for a CPU engine."""
        w = family(self.workload).build(self.qps, 0, 4 * self.requests)
        fits = [r for r in w.requests if r.prompt_len + r.output_len <= MAX_CONTEXT][: self.requests]
        specs = tuple(fits[:TINY_REQUESTS] if tiny else fits)
        if tiny:
            specs = tuple(replace(r, prompt_len=min(r.prompt_len, 64), output_len=min(r.output_len, 4)) for r in specs)
        base = specs[0].arrival
        specs = tuple(replace(r, arrival=r.arrival - base) for r in specs)
        w = Workload(self.name, specs, {"qps": self.qps, "requests": len(specs)})
        return w if tiny else w.rescaled(self.qps)  # the rate of the requests kept (a tiny window may be a burst)


SCENARIOS = (
    Scenario("multi-turn", "multi-turn", 250, 18.6, SLO(2.0, 0.1)),
    Scenario("mooncake-conv", "mooncake-conv", 40, 4.0, SLO(10.0, 0.1)),
)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def run_name(sc: Scenario, policy: str, caching: bool) -> str:
    return f"{sc.name}-{policy}{'-cache' if caching else ''}"


def cuda_or_exit(tiny: bool) -> None:
    """A GPU run without a CUDA GPU stops here, in one line (exit 2), before anything is built."""
    if tiny:
        return
    try:
        import torch

        found = torch.cuda.is_available()
    except ImportError:
        found = False
    if not found:
        print(
            "prefix_cache_gpu.py needs a CUDA GPU and torch; found none (a CPU plumbing check: --tiny)", file=sys.stderr
        )
        sys.exit(2)


class Engines:
    """One engine replica, started on first use (a finished grid builds none)."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.cluster: Any = None

    def get(self) -> Any:
        if self.cluster is None:
            from fairbatching.engine.cluster import EngineCluster

            spec = EngineSpec("llama-3-8b", MAX_CONTEXT)
            if self.tiny:
                spec = EngineSpec("tiny", 4096, num_blocks=2000, device="cpu")
            start = time.time()
            self.cluster = EngineCluster(spec, [None])
            log(f"engine ready in {time.time() - start:.1f} s: {self.cluster.kv_blocks[0]} KV blocks")
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()


def row(sc: Scenario, policy: str, caching: bool, res: RunResult, wall: float) -> dict:
    """One replay's line of ``summary.csv`` (and its JSON): measured, and the simulator's for the same run."""
    s, sim = res.summary, res.sim
    assert sim is not None, "a GPU result carries its simulation"
    return {
        "run": run_name(sc, policy, caching),
        "scenario": sc.name,
        "policy": policy,
        "prefix_caching": caching,
        "qps": sc.qps,
        "requests": s.requests,
        "finished": s.finished,
        "prefix_hit_rate": s.prefix_hit_rate,
        "slo_attainment": s.slo_attainment,
        "ttft_p99": s.ttft.p99,
        "tbt_p99": s.tbt.p99,
        "sim_prefix_hit_rate": sim.prefix_hit_rate,
        "sim_slo_attainment": sim.slo_attainment,
        "sim_ttft_p99": sim.ttft.p99,
        "sim_tbt_p99": sim.tbt.p99,
        "wall_s": round(wall, 1),
    }


def replay_one(engines: Engines, sc: Scenario, policy: str, caching: bool, args: argparse.Namespace) -> dict | None:
    """Replay one point, or None when its estimated end (simulated span plus overhead) is past the budget."""
    w = sc.build(args.tiny)
    max_len = 4096 if args.tiny else MAX_CONTEXT
    exp = Experiment(w, load_profile(PROFILE), sc.slo, max_model_len=max_len, prefix_caching=caching)
    est = exp.simulate(policy).summary.duration_s + REPLAY_OVERHEAD_S
    start_cost = ENGINE_START_S if engines.cluster is None else 0.0
    if time.time() - T0 + start_cost + 1.2 * est > args.budget_s:
        log(f"budget: {run_name(sc, policy, caching)} (~{est:.0f} s) would end past {args.budget_s:.0f} s; left")
        return None
    start = time.time()
    res = replace(exp, engines=engines.get()).run(policy)
    out = row(sc, policy, caching, res, time.time() - start)
    log(
        f"{run_name(sc, policy, caching)}: hit {out['prefix_hit_rate'] or 0:.1%}, SLO {out['slo_attainment']:.1%} "
        f"(sim {out['sim_slo_attainment']:.1%}), P99 TTFT {out['ttft_p99']:.2f} s, P99 TBT "
        f"{out['tbt_p99'] * 1e3:.0f} ms, wall {out['wall_s']} s (estimated {est:.0f})"
    )
    return out


def write_summary(out: Path) -> int:
    """``summary.csv`` from every replay in ``out/runs``, in the grid's order; the number of rows."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    order = {run_name(sc, p, c): i for i, (sc, p, c) in enumerate(grid())}
    rows.sort(key=lambda r: order.get(r["run"], len(order)))
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: r[k] for k in COLUMNS} for r in rows)
    return len(rows)


def grid() -> list[tuple[Scenario, str, bool]]:
    """Every point, cheapest scenario first, each policy without then with caching."""
    return [(sc, p, c) for sc in SCENARIOS for p in POLICIES for c in (False, True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="runs/*.json and summary.csv go here (resumed)")
    ap.add_argument("--budget-s", type=float, default=290.0, help="wall seconds for the whole call, engine included")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, requests cut short: plumbing")
    args = ap.parse_args(argv)
    cuda_or_exit(args.tiny)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    todo = [(sc, p, c) for sc, p, c in grid() if not (args.out / "runs" / f"{run_name(sc, p, c)}.json").exists()]
    log(f"{len(todo)} of {len(grid())} replays to run (the rest are in {args.out / 'runs'})")
    engines = Engines(args.tiny)
    try:
        for sc, policy, caching in todo:
            got = replay_one(engines, sc, policy, caching, args)
            if got is None:
                continue  # a shorter replay further on may still fit
            path = args.out / "runs" / f"{run_name(sc, policy, caching)}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(got, indent=2) + "\n")
            tmp.replace(path)
            write_summary(args.out)
    finally:
        engines.close()
    done = write_summary(args.out)
    log(f"{done} of {len(grid())} replays in {args.out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
