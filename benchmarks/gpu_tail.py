"""The tail and the lead together on the GPU (issue 26): SLO attainment beside P99 TTFT / TBT, per scenario, at
1.0x / 1.15x / 1.3x the best baseline's simulated capacity, on sustained windows nobody calibrated or tuned on.

Phase ``plan`` (CPU, 25 s on 2 cores): for each scenario, the simulator's capacity (>= 90% of requests meeting
both SLOs) of every policy on that scenario's window, on the bundled ``llama-3-8b-h200-engine`` profile; the
best baseline's (Sarathi or vLLM's policy; FairBatching's own where neither reaches 90%) sets the loads, and
each replay's simulated span estimates its wall time. Phase ``run`` (one GPU, one engine built and warmed once
per process and reused): replays every (scenario, load, policy) point on the wall clock, online calibration
on, each replay one line of ``replays.jsonl`` as soon as it ends; a point already in ``--out``'s
``replays.jsonl`` or in ``--resume``'s is not replayed again, and no replay starts that would end past
``--budget-s``, so a grid longer than one device command runs in parts. Phase ``report`` (CPU): the
simulator's prediction for the same requests beside every GPU replay, and each FairBatching variant against
the best baseline at each load with issue 26's targets marked met / not met: ``tail.json`` and ``README.md``
tables.

  PYTHONPATH=src python3 benchmarks/gpu_tail.py plan --out results/gpu-tail
  PYTHONPATH=src python3 benchmarks/gpu_tail.py run --out $OUT/tail --job conv-2s@1.0,1.15 --job conv-1s@1.0 \\
      --variant fb-age3:fairbatching:late_age_limit=3 --budget-s 540
  (copy that call's replays.jsonl to results/gpu-tail/replays.jsonl, then)
  PYTHONPATH=src python3 benchmarks/gpu_tail.py run --out $OUT/tail --resume results/gpu-tail/replays.jsonl \\
      --variant fb-age3:fairbatching:late_age_limit=3 --budget-s 540 --job conv-1s@1.15 \\
      --job code@1.0=fairbatching,fb-age3,sarathi --job mixed-slo@1.0=fairbatching,fb-age3,vllm \\
      --job long-prompt@1.0=fairbatching,fb-age3,sarathi
  PYTHONPATH=src python3 benchmarks/gpu_tail.py report --out results/gpu-tail
  PYTHONPATH=src python3 benchmarks/gpu_tail.py run --out /tmp/tail --device cpu --tiny   # plumbing, on a CPU

Each device call builds and warms one engine (about 2 minutes, estimated) and replays about 6 minutes; a 600-
request conversation window takes its arrivals (20-30 s at these loads) plus the drain. ``run`` prints the
plan (replays, estimated seconds) before it starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fairbatching.config import policy_config
from fairbatching.core.request import SLO, RequestStatus
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.evaluation.capacity import bracket_search
from fairbatching.metrics.summary import Summary, summarize
from fairbatching.runs import Experiment
from fairbatching.serving.node import REFUSED_LOST
from fairbatching.serving.pricing import StepError
from fairbatching.validate import check_policy_options
from fairbatching.workloads.families import family
from fairbatching.workloads.spec import Workload

T0 = time.time()
PROFILE = "llama-3-8b-h200-engine"
MAX_CONTEXT = 16384
TARGET = 0.9
LOADS = (0.85, 1.0, 1.15, 1.3)
BASELINES = ("sarathi", "vllm")
ENGINE_START_S = 40.0  # building, warming and sizing the engine, once per process (measured 21 s on an H200)
REPLAY_OVERHEAD_S = 3.0  # per replay beyond its simulated span: prompts drawn, requests set up, drain slack
TINY_REQUESTS = 6


@dataclass(frozen=True)
class Scenario:
    """A workload window: ``requests`` consecutive requests of a bundled trace from ``start`` (the calibration
    window was the first 300 Azure conversation requests), or a synthetic family's window ``seed``."""

    name: str
    workload: str
    slo: SLO
    requests: int
    start: int = 0
    seed: int = 0
    fit_context: bool = False  # drop requests longer than the engine's context before taking the window

    def build(self, qps: float, tiny: bool = False) -> Workload:
        """The window at ``qps``; ``tiny``: its first few requests cut to a few tokens (a CPU plumbing check)."""
        n = TINY_REQUESTS if tiny else self.requests
        fam = family(self.workload)
        if fam.trace is None:
            w = fam.build(qps, self.seed, n)
        else:
            full = fam.build(1.0, 0, 10**9)
            if self.fit_context:
                kept = tuple(r for r in full.requests if r.prompt_len + r.output_len <= MAX_CONTEXT)
                full = Workload(full.name, kept, dict(full.meta))
            w = full.head(n, self.start).rescaled(qps)
        specs = w.requests
        if tiny:
            specs = tuple(replace(r, prompt_len=min(r.prompt_len, 48), output_len=min(r.output_len, 6)) for r in specs)
        return Workload(self.name, specs, {"start": self.start, "seed": self.seed, "requests": n})


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("conv-2s", "azure-conv", SLO(2.0, 0.1), 600, start=9000),
        Scenario("conv-1s", "azure-conv", SLO(1.0, 0.05), 600, start=12000),
        Scenario("code", "azure-code", SLO(2.0, 0.1), 200, start=3000),
        # Every request carries its class's SLO; the default (the tight class) sizes Sarathi's token budget.
        Scenario("mixed-slo", "mixed-slo", SLO(0.5, 0.05), 300, seed=7),
        # Long prompts (Mooncake conversation: 12k tokens mean), short outputs; requests past the engine's
        # 16k context are dropped first, so every policy can serve every request of the window.
        Scenario("long-prompt", "mooncake-conv", SLO(10.0, 0.1), 100, start=2000, fit_context=True),
        # Held-out windows ("-b"), first replayed after every policy default and the simulator's pricing were
        # fixed: the same shapes at other trace positions and another synthetic seed.
        Scenario("conv-2s-b", "azure-conv", SLO(2.0, 0.1), 600, start=15000),
        Scenario("conv-1s-b", "azure-conv", SLO(1.0, 0.05), 600, start=4000),
        Scenario("code-b", "azure-code", SLO(2.0, 0.1), 200, start=1500),
        Scenario("mixed-slo-b", "mixed-slo", SLO(0.5, 0.05), 300, seed=8),
        Scenario("long-prompt-b", "mooncake-conv", SLO(10.0, 0.1), 100, start=5000, fit_context=True),
        # Added after long-prompt-b's 100-request rows moved by up to 25 points from one replay to the next: twice the
        # requests, at a trace position no tuning looked at.
        Scenario("long-prompt-c", "mooncake-conv", SLO(10.0, 0.1), 200, start=9000, fit_context=True),
        # Conversation windows first replayed after queue feasibility became the default (c839ae4), at trace
        # positions no tuning or calibration window covers.
        Scenario("conv-1s-c", "azure-conv", SLO(1.0, 0.05), 600, start=6500),
        Scenario("conv-2s-c", "azure-conv", SLO(2.0, 0.1), 600, start=17000),
        # Added for issue 28's held-out count (2026-12-07), planned before any replay, at positions no window covers.
        Scenario("conv-1s-d", "azure-conv", SLO(1.0, 0.05), 600, start=10500),
        Scenario("conv-2s-d", "azure-conv", SLO(2.0, 0.1), 600, start=2000),
    )
}


@dataclass(frozen=True)
class Variant:
    """A policy as replayed: ``label`` in the tables, the policy ``name`` and its options."""

    label: str
    policy: str
    options: tuple[tuple[str, Any], ...] = ()
    admission: str = "none"  # node admission control (none, reject, defer): refused requests count as missed

    @property
    def is_fairbatching(self) -> bool:
        return self.policy == "fairbatching"


DEFAULT_VARIANTS = (Variant("fairbatching", "fairbatching"), Variant("sarathi", "sarathi"), Variant("vllm", "vllm"))


def parse_variant(text: str) -> Variant:
    """``LABEL:POLICY[+ADMISSION][:key=value,...]``, e.g. ``fb-age3:fairbatching:late_age_limit=3`` or
    ``fb-reject:fairbatching+reject``; values as JSON."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"--variant {text!r}: give LABEL:POLICY[+ADMISSION][:key=value,...]")
    label, (policy, _, admission) = parts[0], parts[1].partition("+")
    if admission not in ("", "none", "reject", "defer"):
        raise ConfigError(f"--variant {text!r}: admission {admission!r} is not one of none, reject, defer")
    options: dict[str, Any] = {}
    for item in parts[2].split(",") if len(parts) == 3 and parts[2] else []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--variant {text!r}: option {item!r} is not key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    check_policy_options(policy, options, f"--variant {label}:")
    return Variant(label, policy, tuple(sorted(options.items())), admission or "none")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def point_fields(s: Summary) -> dict:
    classes = [
        {
            "ttft_slo": c.ttft_slo,
            "tpot_slo": c.tpot_slo,
            "requests": c.requests,
            "slo": c.slo_attainment,
            "ttft_p50": c.ttft.p50,
            "ttft_p99": c.ttft.p99,
        }
        for c in s.classes or []
    ]
    return {
        "slo": s.slo_attainment,
        "ttft_p50": s.ttft.p50,
        "ttft_p99": s.ttft.p99,
        "tbt_p99": s.tbt.p99,
        "tpot_p99": s.tpot.p99,
        "refused": s.rejected + s.timed_out,
        "finished": s.finished,
        "requests": s.requests,
        **({"classes": classes} if classes else {}),
    }


def simulate(sc: Scenario, variant: Variant, qps: float, tiny: bool = False, **twin: Any) -> dict:
    """The simulator's run of the same requests, policy and options, as ``experiment`` builds it (``twin``: its
    ``profile``, ``pricing`` and ``step_error``): the fields a replay row records."""
    res = experiment(sc, variant, qps, tiny, **twin).run(variant.policy)
    return {**point_fields(res.summary), "span_s": res.summary.duration_s}


def experiment(
    sc: Scenario,
    variant: Variant,
    qps: float,
    tiny: bool = False,
    profile: str = PROFILE,
    pricing: str | None = None,
    step_error: StepError | None = None,
) -> Experiment:
    """The simulated twin of a replay: the scenario's window at ``qps``, ``variant``'s options and admission, the
    policy planning on ``profile`` and steps priced by ``pricing`` with ``step_error`` (default: the planning
    profile, exactly)."""
    return Experiment(
        sc.build(qps, tiny),
        load_profile(profile),
        sc.slo,
        max_model_len=MAX_CONTEXT,
        policy_options={variant.policy: dict(variant.options)},
        admission=variant.admission,
        pricing=None if pricing is None else load_profile(pricing),
        step_error=step_error,
    )


# --- plan ---------------------------------------------------------------------------------------------------
def _attainment(args: tuple[str, str, float, str]) -> float:
    name, policy, qps, profile = args
    return simulate(SCENARIOS[name], Variant(policy, policy), qps, profile=profile)["slo"]


def sim_capacity(pool: ProcessPoolExecutor, sc: Scenario, policy: str, profile: str) -> float:
    def meets(q: float) -> bool:
        return pool.submit(_attainment, (sc.name, policy, q, profile)).result() >= TARGET

    lo, _hi = bracket_search(meets, 8.0, 0.02, 24)
    return lo


def plan(args: argparse.Namespace) -> None:
    """Each scenario's loads (``--scenarios``: only those, their rows replacing theirs in an existing plan)."""
    path = args.out / "plan.json"
    chosen = args.scenarios or list(SCENARIOS)
    old = json.loads(path.read_text()) if path.is_file() else {"rows": [], "profile": args.profile}
    if old["profile"] != args.profile:
        raise ConfigError(f"{path} plans on {old['profile']}, not --profile {args.profile}: plan into another --out")
    kept = [r for r in old["rows"] if r["scenario"] not in chosen]
    rows = []
    with ProcessPoolExecutor(args.cpus) as pool:
        for sc in (SCENARIOS[name] for name in chosen):
            caps = {p: sim_capacity(pool, sc, p, args.profile) for p in ("fairbatching", *BASELINES)}
            best = max(BASELINES, key=lambda p: caps[p])
            base_policy = best if caps[best] > 0 else "fairbatching"
            base = round(caps[base_policy], 2)
            spans = {
                f"{p}@{f}": pool.submit(simulate, sc, Variant(p, p), round(base * f, 2), False, profile=args.profile)
                for f in LOADS
                for p in ("fairbatching", *BASELINES)
            }
            est = {k: round(v.result()["span_s"], 1) for k, v in spans.items()}
            rows.append(
                {
                    "scenario": sc.name,
                    "sim_capacity_rps": {p: round(c, 2) for p, c in caps.items()},
                    "base_policy": base_policy,
                    "base_rps": base,
                    "span_s": est,
                }
            )
            log(f"{sc.name}: simulated capacity {rows[-1]['sim_capacity_rps']}; loads from {base_policy} {base}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "profile": args.profile,
        "target": TARGET,
        "loads": LOADS,
        "scenarios": [asdict(s) for s in SCENARIOS.values()],
    }
    order = {name: i for i, name in enumerate(SCENARIOS)}
    rows = sorted(kept + rows, key=lambda r: order.get(r["scenario"], len(order)))
    path.write_text(json.dumps({**doc, "rows": rows}, indent=2) + "\n")


# --- run ----------------------------------------------------------------------------------------------------
@dataclass
class Job:
    scenario: Scenario
    load: float
    qps: float
    variant: Variant
    est_s: float

    @property
    def key(self) -> tuple:
        return (self.scenario.name, self.load, self.variant.label)


@dataclass(frozen=True)
class Selection:
    """``SCENARIO[@LOAD,...][=LABEL,...]`` (``--job``): one scenario's loads and policies, run in that order."""

    scenario: str
    loads: tuple[float, ...] = LOADS
    labels: tuple[str, ...] | None = None  # None: every policy and variant


def parse_job(text: str, labels: list[str]) -> Selection:
    head, eq, chosen = text.partition("=")
    name, at, loads = head.partition("@")
    if name not in SCENARIOS:
        raise ConfigError(f"--job {text!r}: unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    try:
        factors = tuple(float(x) for x in loads.split(",")) if at else LOADS
    except ValueError:
        raise ConfigError(f"--job {text!r}: loads {loads!r} are not numbers") from None
    if bad := [x for x in factors if not (math.isfinite(x) and 0 < x <= 4)]:
        raise ConfigError(f"--job {text!r}: load {bad[0]} is not a factor in (0, 4]")
    picked = tuple(chosen.split(",")) if eq else None
    if bad := [x for x in picked or () if x not in labels]:
        raise ConfigError(f"--job {text!r}: policy {bad[0]!r} is not one of {', '.join(labels)}")
    return Selection(name, factors, picked)


def jobs(plan_doc: dict, selections: list[Selection], variants: list[Variant]) -> list[Job]:
    """Selection by selection (in the order given), each load from the lowest up, every policy at that load."""
    rows = {r["scenario"]: r for r in plan_doc["rows"]}
    out = []
    for sel in selections:
        row = rows[sel.scenario]
        for f in sel.loads:
            qps = round(row["base_rps"] * f, 2)
            for v in variants:
                if sel.labels is not None and v.label not in sel.labels:
                    continue
                span = row["span_s"].get(f"{v.policy}@{f}") or max(row["span_s"].values())
                out.append(Job(SCENARIOS[sel.scenario], f, qps, v, span + REPLAY_OVERHEAD_S))
    return out


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        if p.is_file():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def row_key(r: dict) -> tuple:
    return (r["scenario"], r["load"], r["label"])


@dataclass
class Engine:
    """One engine per process, built on first use (a resumed grid with nothing left builds none)."""

    device: str
    tiny: bool
    num_blocks: int | None = None
    runner: Any = None
    info: dict = field(default_factory=dict)

    def get(self) -> Any:
        if self.runner is None:
            import torch

            from fairbatching.engine import build_engine

            start = time.time()
            if self.tiny:
                self.runner = build_engine("tiny", device=self.device, num_blocks=2000, max_context=4096)
            else:
                self.runner = build_engine(
                    "llama-3-8b",
                    device=self.device,
                    max_context=MAX_CONTEXT,
                    num_blocks=self.num_blocks,
                    kv_memory_fraction=0.8,
                )
            cuda = self.runner.device.type == "cuda"
            self.info = {
                "device": torch.cuda.get_device_name(self.runner.device) if cuda else "cpu",
                "model": self.runner.model.config.name,
                "kv_blocks": self.runner.pool.usable,
                "warmup_bytes": self.runner.warmup_bytes,
                "graphs": self.runner.graph_counts,
                "engine_start_s": round(time.time() - start, 1),
            }
            log(f"engine ready: {self.info}")
        return self.runner


STEP_COLUMNS = (
    "scenario,load,label,start,new_tokens,context_tokens,num_seqs,attn_work,seconds,path,prefill_chunks,"
    "max_chunk,max_prefix"
)


def append_steps(path: Path, row: dict, steps: list[tuple]) -> None:
    """Every step of a replay as a line of ``path`` (gzip members appended, one per replay; the header once):
    the data simulator fidelity is checked and refitted on, from windows nobody calibrated on."""
    import gzip

    lines = [] if path.exists() else [STEP_COLUMNS]
    key = f"{row['scenario']},{row['load']},{row['label']}"
    lines += [",".join([key, *(f"{v:.6g}" if isinstance(v, float) else str(v) for v in s)]) for s in steps]
    with gzip.open(path, "at") as f:
        f.write("\n".join(lines) + "\n")


def refusal_kinds(requests: list) -> dict[str, int]:
    """Refused requests by when admission refused them: at arrival (no budget), or once their first token's
    deadline had passed while they waited (``lost``)."""
    ended = [r.finish_reason or "" for r in requests if r.status is RequestStatus.REJECTED]
    lost = sum(reason == REFUSED_LOST for reason in ended)
    return {"arrival": len(ended) - lost, "lost": lost}


def replay_job(
    engine: Engine, job: Job, tiny: bool, note: str = "", profile: str = PROFILE
) -> tuple[dict, list[tuple]]:
    from fairbatching.engine.loop import replay
    from fairbatching.policies import make_policy

    sc, v = job.scenario, job.variant
    w = sc.build(job.qps, tiny)
    prof = load_profile(profile)
    runner = engine.get()
    policy = make_policy(v.policy, prof.cost_model(), tpot_slo=sc.slo.tpot, **dict(v.options))
    start = time.time()
    res = replay(runner, policy, prof.cost_model(), w, sc.slo, admission=v.admission)
    wall = time.time() - start
    s = summarize(v.label, w.name, res.requests, res.end_time, res.busy_time, res.preemptions)
    steps = [(d[0], *r[:5], *d[1:]) for r, d in zip(res.step_rows or [], res.step_detail or [], strict=True)]
    if s.requests != len(w):
        raise RuntimeError(f"replay accounted for {s.requests} of {len(w)} requests")
    return {
        "scenario": sc.name,
        "load": job.load,
        "qps": job.qps,
        "label": v.label,
        "policy": v.policy,
        "options": dict(v.options),
        "config": asdict(policy.config),
        "admission": v.admission,
        "window": {"workload": sc.workload, "start": sc.start, "seed": sc.seed, "requests": len(w)},
        "slo": [sc.slo.ttft, sc.slo.tpot],
        "gpu": point_fields(s),
        "refusals": refusal_kinds(res.requests),
        "wall_s": round(wall, 2),
        "steps": res.iterations,
        "calibration_factors": list(getattr(policy.cost_model, "factors", (1.0, 1.0))),
        **({"profile": profile} if profile != PROFILE else {}),
        **engine.info,
        **({"tiny": True} if tiny else {}),
        **({"code": note} if note else {}),
    }, steps


def run(args: argparse.Namespace) -> None:
    plan_doc = json.loads(args.plan.read_text())
    todo = jobs(plan_doc, args.selections, args.variants)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "replays.jsonl"
    earlier = read_rows([path, *args.resume])
    done = {row_key(r) for r in earlier}
    with path.open("a") as out:
        for r in read_rows(args.resume):  # carried into this output, once
            if row_key(r) not in {row_key(x) for x in read_rows([path])}:
                out.write(json.dumps(r) + "\n")
    todo = [j for j in todo if j.key not in done]
    est = sum(j.est_s for j in todo) + (ENGINE_START_S if todo else 0.0)
    log(
        f"plan: {len(todo)} replays to run ({len(done)} done before), about {est:.0f} s with engine start-up; "
        f"budget {args.budget_s:.0f} s"
    )
    for j in todo:
        log(f"  {j.scenario.name:12s} x{j.load:<5} {j.qps:7.2f} req/s  {j.variant.label:16s} ~{j.est_s:.0f} s")
    if args.dry_plan:
        return
    engine = Engine(args.device, args.tiny, args.num_blocks)
    ran = 0
    for j in todo:
        start_cost = 0.0 if engine.runner is not None else ENGINE_START_S
        if time.time() - T0 + start_cost + j.est_s * 1.2 > args.budget_s:
            log(f"budget: {j.scenario.name} x{j.load} {j.variant.label} (~{j.est_s:.0f} s) would end past it; stop")
            break
        row, steps = replay_job(engine, j, args.tiny, args.note, plan_doc["profile"])
        append_steps(args.out / "steps.csv.gz", row, steps)
        with path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        ran += 1
        g = row["gpu"]
        log(
            f"{j.scenario.name} x{j.load} {j.qps} req/s {j.variant.label}: SLO {g['slo']:.3f}, TTFT p50 "
            f"{g['ttft_p50']:.2f} / p99 {g['ttft_p99']:.2f} s, TBT p99 {g['tbt_p99'] * 1e3:.0f} ms, refused "
            f"{g['refused']}, wall {row['wall_s']:.1f} s (estimated {j.est_s:.0f})"
        )
    log(f"ran {ran} of {len(todo)} replays -> {path}")


# --- report -------------------------------------------------------------------------------------------------
def compare_point(rows: list[dict]) -> list[dict]:
    """Each FairBatching variant against the best baseline at one (scenario, load): the baseline meeting the
    most SLOs on the GPU (ties: the lower P99 TTFT), as users run it (a baseline with our node admission is a
    variant, not a baseline). Targets (issue 26): at 1.0x, attainment >= best + 5
    points and P99 TTFT <= 0.8x the best's; at 1.15x, P99 TTFT no worse than the best's."""
    baselines = [r for r in rows if r["label"] in BASELINES]
    if not baselines:
        return []
    best = max(baselines, key=lambda r: (r["gpu"]["slo"], -r["gpu"]["ttft_p99"]))
    out = []
    for r in (r for r in rows if r["policy"] == "fairbatching"):
        d_pts = 100 * (r["gpu"]["slo"] - best["gpu"]["slo"])
        ratio = r["gpu"]["ttft_p99"] / best["gpu"]["ttft_p99"] if best["gpu"]["ttft_p99"] > 0 else math.inf
        targets: dict[str, bool] = {}
        if r["load"] == 1.0:
            targets = {"slo_plus_5pts": d_pts >= 5.0, "ttft_p99_le_0.8x": ratio <= 0.8}
        elif r["load"] == 1.15:
            targets = {"ttft_p99_le_1.0x": ratio <= 1.0}
        tight = _tightest_class_ratio(r, best)
        out.append(
            {
                "label": r["label"],
                "best_baseline": best["label"],
                "slo_delta_pts": round(d_pts, 1),
                "ttft_p99_ratio": round(ratio, 2),
                **({"tightest_class_ttft_p99_ratio": round(tight, 2)} if tight is not None else {}),
                "targets": targets,
                "met": all(targets.values()) if targets else None,
            }
        )
    return out


def _tightest_class_ratio(row: dict, best: dict) -> float | None:
    """P99 TTFT of the tightest SLO class, ``row``'s over ``best``'s, where both recorded classes."""
    mine, theirs = row["gpu"].get("classes"), best["gpu"].get("classes")
    if not mine or not theirs or theirs[0]["ttft_p99"] <= 0:
        return None
    return mine[0]["ttft_p99"] / theirs[0]["ttft_p99"]


def build_report(replays: list[dict], sims: dict[tuple, dict]) -> dict:
    """Points grouped by scenario and load (``replays`` in the order they ran: the last replay of a point counts),
    each replay with its simulation, and the comparisons."""
    latest = {row_key(r): r for r in replays}  # a point replayed again: its last replay counts
    points = []
    for scenario in dict.fromkeys(k[0] for k in latest):
        for load in sorted({k[1] for k in latest if k[0] == scenario}):
            rows = [r for k, r in latest.items() if k[:2] == (scenario, load)]
            for r in rows:
                r["sim"] = sims.get(row_key(r))
            points.append(
                {
                    "scenario": scenario,
                    "load": load,
                    "qps": rows[0]["qps"],
                    "policies": rows,
                    "vs_best_baseline": compare_point(rows),
                }
            )
    profiles = sorted({r.get("profile", PROFILE) for r in latest.values()})
    return {"profile": ", ".join(profiles), "points": points, "capacity": capacity_brackets(as_last_replayed(replays))}


def capacity_brackets(rows: list[dict]) -> list[dict]:
    """Where each policy's GPU capacity (90% of requests meeting both SLOs) lies, from the loads replayed:
    ``[lo, hi)``, lo the highest rate met below the lowest rate missed (None: no such replay). Each
    FairBatching variant's lead over the best baseline is then bounded: at least ``lo / best baseline's hi``,
    at most ``hi / best baseline's lo``; the 1.10x target is met when the lower bound reaches it."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == scenario]
        brackets = {}
        for label in dict.fromkeys(r["label"] for r in mine):
            pts = sorted((r["qps"], r["gpu"]["slo"] >= TARGET) for r in mine if r["label"] == label)
            hi = next((q for q, ok in pts if not ok), None)
            lo = max((q for q, ok in pts if ok and (hi is None or q < hi)), default=None)
            brackets[label] = (lo, hi, next(r["policy"] for r in mine if r["label"] == label))
        base = {k: v for k, v in brackets.items() if k in BASELINES}
        if not base:
            continue
        # The best baseline is the one whose capacity may be highest: the highest hi (None: unbounded).
        best = max(base, key=lambda k: (base[k][1] is None, base[k][1] or 0.0, base[k][0] or 0.0))
        b_lo, b_hi, _ = base[best]
        for label, (lo, hi, policy) in brackets.items():
            row = {"scenario": scenario, "label": label, "policy": policy, "lo": lo, "hi": hi, "best_baseline": best}
            if policy == "fairbatching":
                at_least = lo / b_hi if lo and b_hi else None
                at_most = hi / b_lo if hi and b_lo else None
                met = True if at_least is not None and at_least >= 1.10 else None
                if at_most is not None and at_most < 1.10:
                    met = False
                row |= {"lead_at_least": at_least, "lead_at_most": at_most, "met": met}
            out.append(row)
    return out


#: Defaults that changed after rows were replayed without recording their whole config (``config``): what those
#: rows ran. Queue feasibility (bd2115f) made ``queue_margin`` 0.5; every such row predates it.
BEFORE_RECORDED_CONFIG = {"fairbatching": {"queue_margin": None}}


def row_variant(r: dict) -> Variant:
    """The variant a replay row ran: its whole recorded config, or its options over the defaults of its time."""
    if "config" in r:  # less the TPOT SLO, which the simulation takes from the scenario as the replay did (unless set)
        options = {k: v for k, v in r["config"].items() if k != "tpot_slo" or k in r["options"]}
    else:
        options = {**BEFORE_RECORDED_CONFIG.get(r["policy"], {}), **r["options"]}
    return Variant(r["label"], r["policy"], tuple(sorted(options.items())), r.get("admission", "none"))


def as_last_replayed(replays: list[dict]) -> list[dict]:
    """The latest replay of each point (``replays`` in the order they ran), less those whose policy did not run as
    its (scenario, label)'s last replay did (options resolved over the defaults): a capacity bracket, and its
    simulated twin, is one policy's, not a default before a change mixed with the default after it."""

    def ran(r: dict) -> tuple:
        v = row_variant(r)
        return policy_config(v.policy).resolve(None, dict(v.options)), v.admission

    last = {(r["scenario"], r["label"]): ran(r) for r in replays}
    latest = {row_key(r): r for r in replays}
    return [r for r in latest.values() if ran(r) == last[(r["scenario"], r["label"])]]


def _sim_row(r: dict) -> dict:
    return simulate(
        SCENARIOS[r["scenario"]], row_variant(r), r["qps"], bool(r.get("tiny")), profile=r.get("profile", PROFILE)
    )


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _lead(at_least: float | None, at_most: float | None) -> str:
    """A lead's bracket, saying which side the replayed loads leave open."""
    if at_least is not None and at_most is not None:
        return f"{at_least:.2f}x - {at_most:.2f}x"
    if at_least is not None:
        return f">= {at_least:.2f}x"
    return "unknown" if at_most is None else f"<= {at_most:.2f}x"


def markdown(doc: dict) -> str:
    lines = [
        "| scenario | load | req/s | policy | SLO met | (sim) | P50 TTFT s | P99 TTFT s | (sim) | P99 TBT ms | "
        "refused | wall s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in doc["points"]:
        for r in p["policies"]:
            g, s = r["gpu"], r.get("sim") or {}
            lines.append(
                f"| {p['scenario']} | {p['load']}x | {p['qps']} | {r['label']} | {_pct(g['slo'])} | "
                f"{_pct(s.get('slo'))} | {_fmt(g['ttft_p50'])} | {_fmt(g['ttft_p99'])} | "
                f"{_fmt(s.get('ttft_p99'))} | {_fmt(g['tbt_p99'], 1e3, 0)} | {g['refused']} | {r['wall_s']:.0f} |"
            )
    lines += [
        "",
        "| scenario | load | FairBatching | best baseline | SLO met vs best (pts) | P99 TTFT vs best | "
        "tightest class's P99 TTFT vs best | target | met |",
        "|---|---:|---|---|---:|---:|---:|---|---|",
    ]
    for p in doc["points"]:
        for c in p["vs_best_baseline"]:
            target = ", ".join(c["targets"]) or "(none at this load)"
            met = "-" if c["met"] is None else ("met" if c["met"] else "NOT met")
            tight = c.get("tightest_class_ttft_p99_ratio")
            lines.append(
                f"| {p['scenario']} | {p['load']}x | {c['label']} | {c['best_baseline']} | {c['slo_delta_pts']:+.1f} | "
                f"{c['ttft_p99_ratio']:.2f}x | {'-' if tight is None else f'{tight:.2f}x'} | {target} | {met} |"
            )
    lines += class_lines(doc)
    lines += [
        "",
        "Capacity (90% of requests meeting both SLOs) on the GPU, bracketed by the loads replayed: it lies in "
        "[met, missed) req/s; a FairBatching variant's lead over the best baseline (the one whose capacity may be "
        "highest) is at least met / the baseline's missed and at most missed / the baseline's met. Target: >= 1.10x.",
        "",
        "| scenario | policy | met at req/s | missed at req/s | lead vs best baseline | target |",
        "|---|---|---:|---:|---|---|",
    ]
    for c in doc.get("capacity", []):
        lead = target = ""
        if c["policy"] == "fairbatching":
            lead = f"{_lead(c['lead_at_least'], c['lead_at_most'])} vs {c['best_baseline']}"
            target = {True: "met", False: "NOT met", None: "open"}[c["met"]]
        lines.append(f"| {c['scenario']} | {c['label']} | {_fmt(c['lo'])} | {_fmt(c['hi'])} | {lead} | {target} |")
    return "\n".join(lines) + "\n"


def class_lines(doc: dict) -> list[str]:
    """Per SLO class, for the replays whose requests carry several (the mixed-SLO windows): pooled, P99 TTFT is
    the relaxed class's, which deadline order spends on purpose; a tiered SLO is judged class by class."""
    rows = [(p, r) for p in doc["points"] for r in p["policies"] if r["gpu"].get("classes")]
    if not rows:
        return []
    lines = [
        "",
        "Per SLO class (replays recorded since per-class metrics; `(sim)` as above):",
        "",
        "| scenario | load | policy | class TTFT / TPOT | requests | SLO met | (sim) | P50 TTFT s | P99 TTFT s "
        "| (sim) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p, r in rows:
        sims = {(c["ttft_slo"], c["tpot_slo"]): c for c in (r.get("sim") or {}).get("classes", [])}
        for c in r["gpu"]["classes"]:
            s = sims.get((c["ttft_slo"], c["tpot_slo"]), {})
            lines.append(
                f"| {p['scenario']} | {p['load']}x | {r['label']} | {c['ttft_slo']:g} s / {c['tpot_slo'] * 1e3:g} ms | "
                f"{c['requests']} | {_pct(c['slo'])} | {_pct(s.get('slo'))} | {_fmt(c['ttft_p50'])} | "
                f"{_fmt(c['ttft_p99'])} | {_fmt(s.get('ttft_p99'))} |"
            )
    return lines


# A README's hand-written reading of the tables starts here; the report keeps it when it rewrites the tables.
NOTES = "## Reading it"


def report(args: argparse.Namespace) -> None:
    replays = read_rows([*args.resume, args.out / "replays.jsonl"])  # in the order they ran
    if not replays:
        raise ConfigError(f"no replays in {args.out / 'replays.jsonl'}")
    latest = {row_key(r): r for r in replays}
    with ProcessPoolExecutor(args.cpus) as pool:
        futures = {k: pool.submit(_sim_row, r) for k, r in latest.items()}
        sims = {k: f.result() for k, f in futures.items()}
    doc = build_report(replays, sims)
    (args.out / "tail.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    readme = args.out / "README.md"
    notes = readme.read_text().partition(NOTES)[2] if readme.is_file() else ""
    readme.write_text(readme_head(doc, replays, args.out) + table + (f"\n{NOTES}{notes}" if notes else ""))
    print(table)
    log(f"wrote {args.out / 'tail.json'} and {args.out / 'README.md'}")


def readme_head(doc: dict, replays: list[dict], out: Path) -> str:
    """What the tables are, from what the replays carry: device, engine, windows, loads."""
    devices = sorted({r.get("device", "?") for r in replays})
    windows = {r["scenario"]: r["window"] for r in replays}
    lines = [
        "# GPU tail: SLO attainment beside P99 TTFT and P99 TBT, at the best baseline's capacity and above",
        "",
        f"Device: {', '.join(devices)}; {len(replays)} replays in `replays.jsonl` (a point replayed again: its last "
        f"replay counts). Policies plan on `{doc['profile']}` with online calibration on; `(sim)` is the simulator "
        "on the same profile and the same requests. Loads are multiples of the best baseline's simulated capacity on "
        "that window (`plan.json`; FairBatching's own where no baseline reaches 90%). Windows:",
        "",
    ]
    for name, w in windows.items():
        sc = SCENARIOS[name]
        where = f"seed {w['seed']}" if family(sc.workload).trace is None else f"requests from {w['start']}"
        lines.append(
            f"- {name}: {w['requests']} {sc.workload} {where}, SLO {sc.slo.ttft:g} s / {sc.slo.tpot * 1e3:g} ms"
        )
    codes: dict[str, set[str]] = {}
    for r in replays:
        if r.get("code"):
            codes.setdefault(r["code"], set()).add(r["label"])
    if codes:
        lines += [
            "",
            "Rows that name the commit they replayed (their `code`; rows without one are the first three calls in "
            "commands.md; every `(sim)` runs today's code):",
            "",
        ]
        lines += [f"- {code}: {', '.join(sorted(labels))}" for code, labels in sorted(codes.items())]
    lines += [
        "",
        "Made by (the device commands that replayed are in commands.md beside this file):",
        "",
        f"    PYTHONPATH=src python3 benchmarks/gpu_tail.py report --out {out}",
        "",
        "Targets (issue 26), against the baseline (Sarathi or vLLM's policy, as users run them: `sarathi-reject` "
        "is a variant) meeting the most SLOs at that load on the GPU: at 1.0x, SLO attainment >= best + 5 points "
        "and P99 TTFT <= 0.8x the best's; at 1.15x, P99 TTFT <= the best's; capacity at 90% >= 1.10x the best "
        "baseline's, bracketed by the loads replayed (last table). A refused request counts as missed; P99 TTFT "
        "is over the requests served.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=("plan", "run", "report"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plan", type=Path, default=Path("results/gpu-tail/plan.json"), help="plan.json (run)")
    ap.add_argument("--resume", type=Path, action="append", default=[], help="replays.jsonl of an earlier part")
    ap.add_argument("--scenarios", help=f"comma-separated subset, in the order to run: {', '.join(SCENARIOS)}")
    ap.add_argument("--loads", help="comma-separated subset of the load factors 1.0,1.15,1.3")
    ap.add_argument("--policies", help="comma-separated subset of the labels to replay (default: all)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:POLICY[:key=value,...]",
        help="another policy configuration to replay, e.g. fb-age3:fairbatching:late_age_limit=3 (repeatable)",
    )
    ap.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="SCENARIO[@LOAD,...][=LABEL,...]",
        help="run: what to replay, in order (repeatable), e.g. conv-2s@1.0,1.15 or code@1.0=fairbatching,sarathi; "
        "default: --scenarios x --loads x --policies",
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no replay that would end past this")
    ap.add_argument("--cpus", type=int, default=2, help="simulator processes (plan, report)")
    ap.add_argument(
        "--profile", default=PROFILE, help="plan: the profile the policies plan on and the simulator prices"
    )
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (with --tiny)")
    ap.add_argument(
        "--num-blocks", type=int, help="KV blocks to allocate (default: sized after warm-up, at most 0.8 of free)"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny model and a handful of requests: plumbing check")
    ap.add_argument("--dry-plan", action="store_true", help="run: print what would run, and stop")
    ap.add_argument("--note", default="", help="run: recorded in every row as its `code` (e.g. the commit replayed)")
    ap.add_argument(
        "--any-gpu", action="store_true", help="run: replay a plan made on another GPU model's profile (its loads)"
    )
    args = ap.parse_args()
    try:
        args.variants = [*DEFAULT_VARIANTS, *(parse_variant(v) for v in args.variant)]
        if len({v.label for v in args.variants}) != len(args.variants):
            raise ConfigError("--variant labels must differ from each other and from fairbatching, sarathi, vllm")
        if args.policies:
            keep = args.policies.split(",")
            if bad := [p for p in keep if p not in {v.label for v in args.variants}]:
                raise ConfigError(f"--policies {bad[0]!r}: not one of {', '.join(v.label for v in args.variants)}")
            args.variants = [v for v in args.variants if v.label in keep]
        if args.scenarios:
            args.scenarios = args.scenarios.split(",")
            if bad := [s for s in args.scenarios if s not in SCENARIOS]:
                raise ConfigError(f"--scenarios {bad[0]!r}: not one of {', '.join(SCENARIOS)}")
        if args.loads:
            args.loads = [float(x) for x in args.loads.split(",")]
            if bad := [x for x in args.loads if x not in LOADS]:
                raise ConfigError(f"--loads {bad[0]}: not one of {', '.join(map(str, LOADS))}")
        labels = [v.label for v in args.variants]
        args.selections = [parse_job(j, labels) for j in args.job] or [
            Selection(s, tuple(args.loads or LOADS)) for s in args.scenarios or SCENARIOS
        ]
        if args.phase == "run" and not args.plan.is_file():
            raise ConfigError(f"--plan {args.plan}: no such file (make it with the plan phase)")
        _check_device(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        {"plan": plan, "run": run, "report": report}[args.phase](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        log("interrupted: every replay written so far is whole; rerun to continue")
        sys.exit(130)
    log("done")


def _check_device(args: argparse.Namespace) -> None:
    if args.phase != "run" or args.dry_plan:
        return
    import torch

    if args.tiny:
        args.device = args.device or "cpu"
    elif args.device == "cpu":
        raise ConfigError("--device cpu runs only the tiny model: add --tiny")
    if (args.device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("the GPU tail benchmark needs a CUDA GPU; found none (a CPU check: --device cpu --tiny)")
    args.device = args.device or "cuda"
    if args.device.startswith("cuda") and not args.any_gpu:
        problem = plan_gpu_mismatch(args.plan, torch.cuda.get_device_name(torch.device(args.device)))
        if problem:
            raise ConfigError(problem)


def plan_gpu_mismatch(plan: Path, device: str) -> str | None:
    """Why ``plan`` is not this GPU's: its loads are multiples of capacities simulated on its profile, so replayed
    on another GPU model they are another load (an H100 plan on an H200 is light, the reverse an overload), and the
    rows would sit in a table of the wrong GPU. None where the profile was measured on ``device`` (or says not)."""
    profile = json.loads(plan.read_text())["profile"]
    measured_on = load_profile(profile).hardware.get("device")
    if measured_on is None or measured_on == device:
        return None
    return (
        f"--plan {plan} plans on {profile}, measured on {measured_on}; this GPU is {device}, "
        "so its loads would be another GPU's (--any-gpu replays them anyway)"
    )


if __name__ == "__main__":
    main()
