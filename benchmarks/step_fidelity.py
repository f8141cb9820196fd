"""How well a cost model prices the steps the GPU engine really ran, on windows nobody calibrated on (issue 28).

Reads the step logs of the GPU tail replays (``--steps``, default results/gpu-tail: steps-call*.csv.gz, every
executed step, its shape, how the engine ran it and when it started; replays.jsonl) and prices each step at its
*period* (its start to the next step's start in the same replay: the step plus the host work after it; the step
alone where the loop idled). Three groups of calls: train (``--train``, default call 1: the refit's steps), held out
(``--held-out``, default calls 2 and 3, replayed with the train call) and fresh held out (``--fresh``, default
calls 5-10, replayed after the refit was bundled; call 4 was lost; may be empty). ``--profile`` (default
llama-3-8b-h200-engine) is the profile the replays' policies planned on; its refit is named after it, ``-engine``
becoming ``-serving``.

Phase ``analyse``: the ratio measured period / a profile's prediction per step kind and engine path, and how it
depends on what the profile's features leave out (prefill chunk count, largest chunk, deepest prefix, eager vs
graph); ``step_fidelity.md``. Phase ``fit``: the profile's model refitted on the steps of the TRAIN calls only and
its error on the others (never the same replays), per step kind; with ``--save``, the fitted profile as JSON.
Phase ``sample``: a few thousand train and held-out steps, as profile rows at their periods, for the CPU test
(tests/data/gpu-steps-{train,held-out}.csv.gz).
Phase ``resim``: the simulator on the same requests as every GPU replay, policies planning on the bundled profile
as on the GPU, steps priced by the bundled profile (before) and by the fitted one (after); cells within 5 points
of the GPU per group of calls and each point's policy ranking; ``resim.json``.
Phase ``capacity``: each policy's simulated capacity (90% attainment) on the replayed windows, under both pricings,
beside the GPU's capacity bracket from the loads replayed (benchmarks/gpu_tail.py's ``capacity_brackets``);
``capacity.json``.
Phase ``record``: what ``resim.json`` and the step logs measured, written into the data set's two bundled
profiles' ``fit.validation`` (the record ``fairbatching profile`` writes after its own held-out
replays; ``fairbatching profiles`` shows it): the replays and steps each profile was not fitted on, its step-period
MAPE there, and the simulated SLO attainment against the GPU's per policy.
Phase ``validate``: issue 28's counts over both GPUs' ``resim.json`` and ``capacity.json`` (results/sim-vs-gpu and
results/sim-vs-gpu-h100): held-out cells within 5 points, capacities within 5%, rankings; ``validation.json``.

  PYTHONPATH=src python3 benchmarks/step_fidelity.py analyse --out results/sim-vs-gpu
  PYTHONPATH=src python3 benchmarks/step_fidelity.py fit --out results/sim-vs-gpu \\
      --save src/fairbatching/costmodel/profiles/llama-3-8b-h200-serving.json
  PYTHONPATH=src python3 benchmarks/step_fidelity.py resim --out results/sim-vs-gpu \\
      --pricing llama-3-8b-h200-serving
  PYTHONPATH=src python3 benchmarks/step_fidelity.py capacity --out results/sim-vs-gpu
  PYTHONPATH=src python3 benchmarks/step_fidelity.py sample --out tests/data
  PYTHONPATH=src python3 benchmarks/step_fidelity.py record --out results/sim-vs-gpu
  PYTHONPATH=src python3 benchmarks/step_fidelity.py validate --out results/sim-vs-gpu

The H100 replays (results/gpu-tail-h100; every phase in results/sim-vs-gpu-h100/README.md):

  PYTHONPATH=src python3 benchmarks/step_fidelity.py analyse --out results/sim-vs-gpu-h100 \\
      --steps results/gpu-tail-h100 --profile llama-3-8b-h100-engine --train 2 --held-out 3 --fresh ''
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from fairbatching.costmodel.fit import ROW_FIELDS, fit_cost_model
from fairbatching.costmodel.model import CostModel
from fairbatching.costmodel.profile import load_profile
from fairbatching.costmodel.serving import period_mape
from fairbatching.errors import ConfigError, ProfileError
from fairbatching.validate import atomic_write_text

# the default data set: the H200 tail replays
PROFILE = "llama-3-8b-h200-engine"
STEPS = Path("results/gpu-tail")
TRAIN_CALLS = (1,)  # conversation windows at 1.0x / 1.15x
HELD_OUT_CALLS = (2, 3)  # conversation at 0.85x and other variants; code, mixed SLO classes, long prompts
# replayed after the refit was bundled (code 6586fc4, 8292536, a40be5a); call 4 was lost
FRESH_CALLS = (5, 6, 7, 8, 9, 10)
IDLE_GAP_S = 0.02  # a step whose next one started later than this after it ended: the loop idled in between
COLUMNS = ("scenario", "load", "label", "start", "new_tokens", "context_tokens", "num_seqs", "attn_work", "seconds")
PATHS = ("decode-graph", "mixed-graph", "piecewise", "eager")
TOLERANCE_PTS = 5.0  # as evaluation/calibrate.py's ATTAINMENT_TOLERANCE_PTS
STEP_TOLERANCE = 0.10  # as its STEP_MAPE_TOLERANCE
CAPACITY_TOLERANCE = 0.02  # capacity: relative width the simulated search stops at (as gpu_tail's plan)
CAPACITY_POINTS = 24  # capacity: most simulations per search


@dataclass(frozen=True)
class CallGroup:
    """GPU calls whose steps and replays are scored together."""

    key: str  # in resim.json
    short: str  # before a window's name in the tables
    name: str
    calls: tuple[int, ...]


def calls_label(calls: tuple[int, ...]) -> str:
    """The calls as "call 1", "calls 2, 3" or "calls 5-8"."""
    if len(calls) == 1:
        return f"call {calls[0]}"
    if len(calls) > 2 and calls == tuple(range(calls[0], calls[-1] + 1)):
        return f"calls {calls[0]}-{calls[-1]}"
    return f"calls {', '.join(map(str, calls))}"


@dataclass(frozen=True)
class Data:
    """The replays scored: their step logs and replays.jsonl in ``steps``, the profile their policies planned on,
    and the call groups (train first, then the groups not fitted on)."""

    steps: Path
    profile: str
    groups: tuple[CallGroup, ...]

    @classmethod
    def of(
        cls, steps: Path, profile: str, train: tuple[int, ...], held_out: tuple[int, ...], fresh: tuple[int, ...]
    ) -> Data:
        """Train, held-out and fresh calls; a group with no calls is left out."""
        kinds = (
            ("train", "train", "train ({})", train),
            ("held_out", "held out", "held out ({})", held_out),
            ("fresh", "fresh", "fresh held out ({}, measured after the refit)", fresh),
        )
        return cls(steps, profile, tuple(CallGroup(k, s, n.format(calls_label(c)), c) for k, s, n, c in kinds if c))

    @property
    def train(self) -> CallGroup:
        return self.groups[0]

    @property
    def not_fitted(self) -> tuple[CallGroup, ...]:
        return self.groups[1:]

    @property
    def serving(self) -> str:
        """The refit's name."""
        return self.profile.removesuffix("-engine") + "-serving"

    def files(self) -> dict[int, Path]:
        """Every call's step log."""
        return {c: self.steps / f"steps-call{c}.csv.gz" for g in self.groups for c in g.calls}


H200 = Data.of(STEPS, PROFILE, TRAIN_CALLS, HELD_OUT_CALLS, FRESH_CALLS)


@dataclass(frozen=True)
class Steps:
    """Logged steps as arrays; ``period`` is what the simulator's clock should advance per step."""

    call: np.ndarray
    replay: np.ndarray  # "call|scenario|load|label"
    features: np.ndarray  # new_tokens, context_tokens, num_seqs, attn_work
    period: np.ndarray
    path: np.ndarray
    chunks: np.ndarray
    max_chunk: np.ndarray
    max_prefix: np.ndarray

    @property
    def prefill(self) -> np.ndarray:
        return self.features[:, 0] > self.features[:, 2]

    def rows(self) -> np.ndarray:
        """Profile rows (new, context, seqs, attn work, seconds), each step at its period."""
        return np.column_stack([self.features, self.period])

    def select(self, mask: np.ndarray) -> Steps:
        return Steps(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def of(self, group: CallGroup) -> np.ndarray:
        """Mask of the steps logged by ``group``'s calls."""
        return np.isin(self.call, group.calls)


def read_steps(files: dict[int, Path]) -> Steps:
    """The steps of ``{call: csv.gz}``, in log order (replays contiguous, steps in start order)."""
    recs: list[tuple[int, dict[str, str]]] = []
    for call, path in files.items():
        try:
            with gzip.open(path, "rt", newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in (*COLUMNS, "path", "prefill_chunks") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ProfileError(f"{path}: missing column(s) {', '.join(missing)}")
                recs += [(call, r) for r in reader]
        except (OSError, EOFError, csv.Error) as exc:
            raise ProfileError(f"{path}: not a readable gzipped CSV step log: {exc}") from None
    if not recs:
        raise ProfileError(f"no steps in {', '.join(map(str, files.values()))}")
    try:
        num = {c: np.array([float(r[c]) for _, r in recs]) for c in (*COLUMNS[3:], "prefill_chunks")}
        extra = {c: np.array([float(r.get(c) or 0) for _, r in recs]) for c in ("max_chunk", "max_prefix")}
    except ValueError as exc:
        raise ProfileError(f"step log: a bad number ({exc})") from None
    replay = np.array([f"{c}|{r['scenario']}|{r['load']}|{r['label']}" for c, r in recs])
    start, seconds = num["start"], num["seconds"]
    period = seconds.copy()
    same = replay[1:] == replay[:-1]
    period[:-1][same] = (start[1:] - start[:-1])[same]
    idle = period - seconds > IDLE_GAP_S
    period[idle] = seconds[idle]
    return Steps(
        call=np.array([c for c, _ in recs]),
        replay=replay,
        features=np.column_stack([num["new_tokens"], num["context_tokens"], num["num_seqs"], num["attn_work"]]),
        period=period,
        path=np.array([r["path"] for _, r in recs]),
        chunks=num["prefill_chunks"],
        max_chunk=extra["max_chunk"],
        max_prefix=extra["max_prefix"],
    )


def predict(model: CostModel, steps: Steps) -> np.ndarray:
    return np.array([model.predict(a, b, int(c), d) for a, b, c, d in steps.features.tolist()])


def mape_by_kind(model: CostModel, steps: Steps) -> dict[str, float | None]:
    """Mean absolute relative error of the predicted period, per step kind and over all steps (the measure
    ``fairbatching profile``'s validation records)."""
    return period_mape(model, steps.rows())


def windows(steps: Steps, mask: np.ndarray) -> str:
    """The windows and loads of the masked steps' replays: "code 1x; conv-1s 0.85x, 1x"."""
    loads: dict[str, set[float]] = {}
    for r in set(steps.replay[mask]):
        _, scenario, load, _ = r.split("|")
        loads.setdefault(scenario, set()).add(float(load))
    return "; ".join(f"{s} {', '.join(f'{x:g}x' for x in sorted(ls))}" for s, ls in sorted(loads.items()))


# --- analyse ------------------------------------------------------------------------------------------------
def _stats(r: np.ndarray) -> str:
    if not len(r):
        return "| 0 | - | - | - |"
    p10, p50, p90 = np.percentile(r, [10, 50, 90])
    return f"| {len(r)} | {p50:.3f} | {p10:.3f} | {p90:.3f} |"


BINS = {
    "prefill chunks": ("chunks", (1, 2, 3, 4, 6, 64)),
    "largest chunk (tokens)": ("max_chunk", (0, 256, 512, 1024, 2048, 4096, 16384)),
    "deepest prefix (tokens)": ("max_prefix", (0, 1, 1000, 4000, 8000, 32768)),
}


def ratio_tables(steps: Steps, models: dict[str, CostModel], data: Data) -> str:
    """Markdown: period / prediction per (call group, kind, path) and, for the prefill steps of each group not
    fitted on, per feature bin."""
    out = []
    for mname, model in models.items():
        ratio = steps.period / predict(model, steps)
        out += [
            f"### period / prediction of `{mname}`",
            "",
            "| steps | kind | path | steps | median | p10 | p90 |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for group in data.groups:
            g = steps.of(group)
            for kind, k in (("decode-only", ~steps.prefill), ("carrying prefill", steps.prefill)):
                for path in PATHS:
                    m = g & k & (steps.path == path)
                    if m.any():
                        out.append(f"| {group.name} | {kind} | {path} {_stats(ratio[m])}")
                out.append(f"| {group.name} | {kind} | all {_stats(ratio[g & k])}")
        out += ["", "Steps carrying prefill not fitted on, by what the profile's features leave out:", ""]
        out += ["| steps | feature | range | steps | median | p10 | p90 |", "|---|---|---|---:|---:|---:|---:|"]
        for group in data.not_fitted:
            held = steps.of(group) & steps.prefill
            for label, (attr, edges) in BINS.items():
                f = getattr(steps, attr)
                for a, b in zip(edges[:-1], edges[1:], strict=True):
                    m = held & (f >= a) & (f < b)
                    if m.any():
                        out.append(f"| {group.short} | {label} | [{a}, {b}) {_stats(ratio[m])}")
            for path in ("mixed-graph", "piecewise", "eager"):
                m = held & (steps.path == path)
                out.append(f"| {group.short} | engine path | {path} {_stats(ratio[m])}")
        out.append("")
    return "\n".join(out)


EXTENSIONS = {
    "engine path (piecewise, eager fixed costs)": ("path",),
    "prefill chunk count": ("chunks",),
    "prefix depth (any prefix; deepest prefix tokens)": ("prefix",),
    "all three": ("path", "chunks", "prefix"),
}


def extension_table(steps: Steps, data: Data) -> str:
    """Would features the profile lacks price held-out steps better? The additive model (the refit's sharpness
    came out p = 1) with extra columns, fitted by non-negative least squares on relative error on the train
    calls, scored on every group."""
    x, y, pf = steps.features, steps.period, steps.prefill.astype(float)
    train = steps.of(data.train)
    head = " | ".join(f"{g.short} decode / prefill MAPE" for g in data.groups)
    lines = [f"| features beyond the profile's | {head} |", "|---|" + "---:|" * len(data.groups)]
    for name, extra in {"none (the profile's features)": (), **EXTENSIONS}.items():
        cols = [np.ones(len(y)), x[:, 2], x[:, 1], x[:, 0], x[:, 3], pf]
        if "path" in extra:
            cols += [(steps.path == "piecewise") * 1.0, (steps.path == "eager") * 1.0]
        if "chunks" in extra:
            cols.append(steps.chunks)
        if "prefix" in extra:
            cols += [(steps.max_prefix > 0) * 1.0, steps.max_prefix * pf]
        design = np.column_stack(cols)
        coef, _ = nnls(design[train] / y[train, None], np.ones(int(train.sum())))
        err = np.abs(design @ coef / y - 1)
        cell = [
            f"{err[g & (pf == 0)].mean():.1%} / {err[g & (pf == 1)].mean():.1%}" for g in map(steps.of, data.groups)
        ]
        lines.append(f"| {name} | {' | '.join(cell)} |")
    return "\n".join(lines) + "\n"


# --- fit ----------------------------------------------------------------------------------------------------
def fit_on(train: Steps, profile: str, name: str, command: str):
    """The bundled profile's model refitted on ``train``'s steps at their periods; the same features, so every
    consumer of a profile prices with it unchanged."""
    report = fit_cost_model(train.rows())
    base = load_profile(profile)
    fit = {**report.as_dict(), "rows_from": "GPU serving steps at their periods", "grid_fit": base.fit}
    prof = replace(base, name=name, params=report.model.params, fit=fit, note=f"serving-calibrated: {command}")
    return prof, report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def errors_table(models: dict[str, CostModel], steps: Steps, data: Data) -> tuple[str, dict]:
    """Markdown and ``{"model / group": MAPE}``: per call group and, for the groups not fitted on, per window."""
    doc, lines = {}, ["| model | steps | decode MAPE | prefill MAPE | all MAPE |", "|---|---|---:|---:|---:|"]
    scenario = np.array([r.split("|")[1] for r in steps.replay])
    for mname, model in models.items():
        rows = [(group.name, steps.of(group)) for group in data.groups]
        for group in data.not_fitted:
            g = steps.of(group)
            rows += [(f"{group.short}: {scen}", g & (scenario == scen)) for scen in sorted(set(scenario[g]))]
        for sname, m in rows:
            e = doc[f"{mname} / {sname}"] = mape_by_kind(model, steps.select(m))
            lines.append(f"| `{mname}` | {sname} | {_pct(e['decode'])} | {_pct(e['prefill'])} | {_pct(e['all'])} |")
    return "\n".join(lines) + "\n", doc


def write_sample(steps: Steps, n: int, path: Path, seed: int) -> None:
    """``n`` steps drawn at random (seeded), as profile rows (``fit.load_profile_rows`` reads them gunzipped)."""
    pick = np.sort(np.random.default_rng(seed).choice(len(steps.period), size=min(n, len(steps.period)), replace=False))
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow([*ROW_FIELDS, "path"])
        for row, kind in zip(steps.rows()[pick].tolist(), steps.path[pick].tolist(), strict=True):
            w.writerow([*(f"{v:.9g}" for v in row), kind])
    tmp.replace(path)


# --- resim --------------------------------------------------------------------------------------------------
def _gpu_tail():
    """benchmarks/gpu_tail.py, a sibling script (imported where needed: also in the workers)."""
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import gpu_tail  # noqa: PLC0415

    return gpu_tail


def _simulate(args: tuple[dict, str, str | None, float]) -> float:
    from fairbatching.serving.pricing import StepError

    r, profile, pricing, noise = args
    gt = _gpu_tail()
    error = StepError(noise=noise) if noise else None
    sim = gt.simulate(
        gt.SCENARIOS[r["scenario"]], gt.row_variant(r), r["qps"], profile=profile, pricing=pricing, step_error=error
    )
    return sim["slo"]


def within_tolerance(sim: float, gpu: float) -> bool:
    """A simulated attainment close enough to the GPU's: the one test every count of issue 28 uses."""
    return abs(sim - gpu) <= TOLERANCE_PTS / 100


def ranking(rows: list[dict], key: str) -> list[str]:
    return [r["label"] for r in sorted(rows, key=lambda r: (-r[key], r["label"]))]


def clear_pairs(cells: list[dict], gap: float = TOLERANCE_PTS / 100) -> list[tuple[dict, dict]]:
    """Pairs of policies at one point that the GPU orders clearly (attainment more than ``gap`` apart)."""
    return [(a, b) for i, a in enumerate(cells) for b in cells[i + 1 :] if abs(a["gpu"] - b["gpu"]) > gap]


def same_order(pair: tuple[dict, dict], key: str) -> bool:
    a, b = pair
    return (a["gpu"] > b["gpu"]) == (a[key] > b[key])


def replay_calls(data: Data) -> dict[tuple[str, float, str], int]:
    """The call whose step log holds each replay (scenario, load, label)."""
    calls = {}
    for call, path in data.files().items():
        with gzip.open(path, "rt", newline="") as f:
            calls |= {(r["scenario"], float(r["load"]), r["label"]): call for r in csv.DictReader(f)}
    return calls


def resim(replays: list[dict], data: Data, pricing: str, cpus: int, noise: float = 0.0) -> dict:
    """Every replay simulated before (bundled pricing) and after (``pricing``, its steps with log-normal
    noise of standard deviation ``noise``: the GPU's per-step spread around the model)."""
    latest = {(r["scenario"], float(r["load"]), r["label"]): r for r in replays}
    calls = replay_calls(data)
    if unlogged := [k for k in latest if k not in calls]:
        raise ProfileError(f"replay {unlogged[0]}: in no step log of calls {tuple(data.files())}")
    rows = list(latest.values())
    with ProcessPoolExecutor(cpus) as pool:
        before = list(pool.map(_simulate, [(r, data.profile, None, 0.0) for r in rows]))
        after = list(pool.map(_simulate, [(r, data.profile, pricing, noise) for r in rows]))
    cells = [
        {
            **{k: r[k] for k in ("scenario", "load", "label")},
            "call": calls[key],
            "fitted_on": calls[key] in data.train.calls,
            "gpu": r["gpu"]["slo"],
            "before": b,
            "after": a,
        }
        for (key, r), b, a in zip(latest.items(), before, after, strict=True)
    ]
    keys = ("before", "after")
    groups = {"all": cells, **{g.key: [c for c in cells if c["call"] in g.calls] for g in data.not_fitted}}
    within = {g: {k: sum(within_tolerance(c[k], c["gpu"]) for c in cs) for k in keys} for g, cs in groups.items()}
    bias = {
        g: {k: round(100 * float(np.mean([c[k] - c["gpu"] for c in cs])), 2) for k in keys} for g, cs in groups.items()
    }
    at_point: dict[tuple, list[dict]] = {}
    for c in cells:
        at_point.setdefault((c["scenario"], c["load"]), []).append(c)
    points = [{"point": sl, **{k: ranking(pc, k) for k in ("gpu", *keys)}} for sl, pc in at_point.items()]
    pairs = [p for pc in at_point.values() for p in clear_pairs(pc)]
    # per group: the clearly ordered pairs with a cell of that group, and how many keep the GPU's order
    pairs_of = {g: [p for p in pairs if any(c in cs for c in p)] for g, cs in groups.items()}
    return {
        "profile": data.profile,
        "pricing_after": pricing,
        "noise_after": noise,
        "cells": cells,
        "cells_per_group": {g: len(cs) for g, cs in groups.items()},
        "within_5pts": within,
        "mean_bias_pts": bias,
        "points": points,
        "same_ranking": {k: sum(p[k] == p["gpu"] for p in points) for k in keys},
        "clear_pairs_same_order": {
            g: {k: [sum(same_order(p, k) for p in ps), len(ps)] for k in keys} for g, ps in pairs_of.items()
        },
    }


def resim_markdown(doc: dict, data: Data) -> str:
    n, w, b, pr = doc["cells_per_group"], doc["within_5pts"], doc["mean_bias_pts"], doc["clear_pairs_same_order"]
    named = {"all": "all", **{g.key: g.name for g in data.not_fitted}}
    lines = [
        "| steps priced by | cells | within 5 pts | mean sim - GPU (pts) | clearly ordered pairs with such a cell, "
        "same order |",
        "|---|---|---:|---:|---:|",
    ]
    after = f"`{doc['pricing_after']}`" + (f", step noise {doc['noise_after']:g}" if doc["noise_after"] else "")
    for k, name in (("before", f"`{doc['profile']}`"), ("after", after)):
        for g, label in named.items():
            lines.append(f"| {name} | {label} | {w[g][k]}/{n[g]} | {b[g][k]:+.1f} | {pr[g][k][0]}/{pr[g][k][1]} |")
    lines += [
        "",
        f"Points with the GPU's exact ranking: {doc['same_ranking']['before']}/{len(doc['points'])} before, "
        f"{doc['same_ranking']['after']}/{len(doc['points'])} after.",
        "",
        "| scenario | load | policy | call | GPU | sim before | sim after |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in doc["cells"]:
        fitted = " (fitted on)" if c["fitted_on"] else ""
        lines.append(
            f"| {c['scenario']} | {c['load']}x | {c['label']} | {c['call']}{fitted} | {c['gpu']:.1%} | "
            f"{c['before']:.1%} | {c['after']:.1%} |"
        )
    return "\n".join(lines) + "\n"


# --- capacity -----------------------------------------------------------------------------------------------
def _capacity(args: tuple[dict, float, str, str | None]) -> float:
    """The highest rate at which the simulator meets the capacity target on ``row``'s window, policy, options and
    admission, searched from ``start`` req/s, steps priced by ``pricing`` (None: the bundled profile)."""
    from fairbatching.evaluation.capacity import bracket_search  # noqa: PLC0415

    row, start, profile, pricing = args
    target = _gpu_tail().TARGET
    lo, _hi = bracket_search(
        lambda q: _simulate(({**row, "qps": q}, profile, pricing, 0.0)) >= target,
        start,
        CAPACITY_TOLERANCE,
        CAPACITY_POINTS,
    )
    return lo


def inside(cap: float, lo: float | None, hi: float | None) -> bool | None:
    """Whether ``cap`` lies in the GPU's bracket ``[lo, hi)``; None where the bracket is open and ``cap`` is on
    its open side (neither side of it is contradicted)."""
    if (lo is not None and cap < lo) or (hi is not None and cap >= hi):
        return False
    return True if lo is not None and hi is not None else None


def bracket_gap(cap: float, lo: float | None, hi: float | None) -> float:
    """How far ``cap`` lies outside the GPU's bracket ``[lo, hi)``, relative to the edge it passed (+: above the
    missed load, -: below the met one; 0 inside or on an open side): issue 28 asks for 5%."""
    if hi is not None and cap >= hi:
        return cap / hi - 1.0
    if lo is not None and cap < lo:
        return cap / lo - 1.0
    return 0.0


def capacity(replays: list[dict], data: Data, pricing: str, cpus: int) -> dict:
    """Every policy's GPU capacity bracket (benchmarks/gpu_tail.py's ``capacity_brackets`` over the latest
    replays that ran as the last did) beside its simulated capacity under the bundled pricing and ``pricing``."""
    gt = _gpu_tail()
    latest = gt.as_last_replayed(replays)
    brackets = gt.capacity_brackets(latest)
    jobs = [
        (next(r for r in latest if (r["scenario"], r["label"]) == (b["scenario"], b["label"])), b["lo"] or b["hi"])
        for b in brackets
    ]
    keys = {"before": None, "after": pricing}
    with ProcessPoolExecutor(cpus) as pool:
        sims = {
            k: list(pool.map(_capacity, [(r, start, data.profile, p) for r, start in jobs])) for k, p in keys.items()
        }
    rows = []
    for i, b in enumerate(brackets):
        row = {k: b[k] for k in ("scenario", "label", "policy", "lo", "hi")}
        for k in keys:
            row |= {
                f"sim_{k}": round(sims[k][i], 2),
                f"inside_{k}": inside(sims[k][i], b["lo"], b["hi"]),
                f"gap_{k}": round(bracket_gap(sims[k][i], b["lo"], b["hi"]), 4),
            }
        rows.append(row)
    closed = [r for r in rows if r["lo"] is not None and r["hi"] is not None]
    return {
        "profile": data.profile,
        "pricing_after": pricing,
        "target": _gpu_tail().TARGET,
        "tolerance": CAPACITY_TOLERANCE,
        "rows": rows,
        "closed_inside": {k: [sum(bool(r[f"inside_{k}"]) for r in closed), len(closed)] for k in keys},
        "closed_within_5pct": {k: [sum(abs(r[f"gap_{k}"]) <= 0.05 for r in closed), len(closed)] for k in keys},
    }


def _rps(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def capacity_markdown(doc: dict) -> str:
    verdict = {True: "inside", False: "OUTSIDE", None: "(open)"}
    lines = [
        f"| scenario | policy | GPU capacity in [met, missed) req/s | sim, `{doc['profile']}` | "
        f"sim, `{doc['pricing_after']}` |",
        "|---|---|---|---:|---:|",
    ]
    for r in doc["rows"]:
        sims = " | ".join(
            f"{r[f'sim_{k}']:.2f} {verdict[r[f'inside_{k}']]}"
            + (f" ({r[f'gap_{k}']:+.1%})" if r[f"inside_{k}"] is False else "")
            for k in ("before", "after")
        )
        lines.append(f"| {r['scenario']} | {r['label']} | [{_rps(r['lo'])}, {_rps(r['hi'])}) | {sims} |")
    c, w = doc["closed_inside"], doc["closed_within_5pct"]
    lines += [
        "",
        f"Closed GPU brackets holding the simulated capacity: {c['before'][0]}/{c['before'][1]} under "
        f"`{doc['profile']}`, {c['after'][0]}/{c['after'][1]} under `{doc['pricing_after']}`; within 5% of "
        f"one: {w['before'][0]}/{w['before'][1]} and {w['after'][0]}/{w['after'][1]}.",
    ]
    return "\n".join(lines) + "\n"


# --- validate -----------------------------------------------------------------------------------------------
SOURCES = (Path("results/sim-vs-gpu"), Path("results/sim-vs-gpu-h100"))  # validate: each GPU's resim + capacity
REPLAYS = {"H200": STEPS / "replays.jsonl", "H100": Path("results/gpu-tail-h100/replays.jsonl")}  # validate: repeats
CELL_TARGET = 0.9  # issue 28: share of held-out cells within TOLERANCE_PTS
CAPACITY_TARGET = 0.05  # issue 28: every simulated capacity within this of the GPU's bracket


def validation_cells(doc: dict) -> list[dict]:
    """A resim.json's cells with what the issue's counts need: the window's size and SLO, and whether each
    pricing was fitted on the replay (the bundled profiles never were: they were calibrated on the first 300
    conversation requests; the refit on its train calls)."""
    scenarios = _gpu_tail().SCENARIOS
    device = "H100" if "h100" in doc["profile"] else "H200"
    return [
        {
            "device": device,
            "scenario": c["scenario"],
            "requests": scenarios[c["scenario"]].requests,
            "slo": [scenarios[c["scenario"]].slo.ttft, scenarios[c["scenario"]].slo.tpot],
            "load": c["load"],
            "policy": c["label"],
            "call": c["call"],
            "gpu": round(c["gpu"], 4),
            "bundled": {"profile": doc["profile"], "sim": round(c["before"], 4), "held_out": True},
            "refit": {"profile": doc["pricing_after"], "sim": round(c["after"], 4), "held_out": not c["fitted_on"]},
        }
        for c in doc["cells"]
    ]


def cell_counts(cells: list[dict], key: str) -> dict:
    """Held-out cells under pricing ``key`` within the tolerance: all, 1 s / 50 ms conversation, >= 600 requests,
    per GPU and per policy (where the misses sit: a policy at its knee moves most with the machine)."""

    def count(cs: list[dict]) -> dict:
        within = sum(within_tolerance(c[key]["sim"], c["gpu"]) for c in cs)
        bias = round(100 * float(np.mean([c[key]["sim"] - c["gpu"] for c in cs])), 2) if cs else None
        return {"cells": len(cs), "within": within, "share": round(within / len(cs), 3) if cs else None, "bias": bias}

    held = [c for c in cells if c[key]["held_out"]]
    return {
        "all": count(held),
        "conv_1s_50ms": count([c for c in held if c["scenario"].startswith("conv-1s")]),
        "600_requests": count([c for c in held if c["requests"] >= 600]),
        **{d: count([c for c in held if c["device"] == d]) for d in sorted({c["device"] for c in held})},
        "policies": {p: count([c for c in held if c["policy"] == p]) for p in sorted({c["policy"] for c in held})},
    }


def read_replays() -> dict[str, list[dict]]:
    """Each GPU's tail replays, in the order they ran."""
    return {d: [json.loads(x) for x in f.read_text().splitlines() if x.strip()] for d, f in REPLAYS.items()}


def gpu_repeats(replays: dict[str, list[dict]]) -> dict:
    """The GPU against itself: every point (window, load, policy as configured) replayed more than once, each
    later replay against the point's first replay on the same machine, or its first replay where that machine
    had none. A session holds one machine and replays one commit, so replays with the same ``code`` ran on the
    same machine, others on another. This is the floor under any simulator's error."""
    pairs = []
    for device, rows in replays.items():
        seen: dict[tuple, dict] = {}
        for r in rows:
            key = (r["scenario"], float(r["load"]), r["label"], json.dumps(r.get("config") or None, sort_keys=True))
            if r["policy"] in _gpu_tail().BASELINES:
                key = key[:3]
            first = seen.setdefault(key, r)
            if r.get("code") is not None and (here := seen.setdefault((*key, r["code"]), r)) is not r:
                first = here
            if first is not r:
                pairs.append(
                    {
                        "device": device,
                        "scenario": r["scenario"],
                        "load": float(r["load"]),
                        "policy": r["label"],
                        "codes": [first.get("code"), r.get("code")],
                        "same_machine": first.get("code") is not None and first.get("code") == r.get("code"),
                        "gpu": [round(first["gpu"]["slo"], 4), round(r["gpu"]["slo"], 4)],
                        "prefill_factors": [
                            round(first["calibration_factors"][1], 3),
                            round(r["calibration_factors"][1], 3),
                        ],
                    }
                )

    def count(ps: list[dict]) -> list[int]:
        return [sum(within_tolerance(p["gpu"][1], p["gpu"][0]) for p in ps), len(ps)]

    return {
        "within_5pts": {
            "same_machine": count([p for p in pairs if p["same_machine"]]),
            "other_machine": count([p for p in pairs if not p["same_machine"]]),
        },
        "pairs": pairs,
    }


def validate(sources: list[Path], replays: dict[str, list[dict]]) -> dict:
    """Issue 28's validation over every GPU's replays: the held-out cells, the capacities and the rankings, under
    the bundled pricing and under the refit, each against the issue's targets."""
    resims = [json.loads((f / "resim.json").read_text()) for f in sources]
    cells = [c for d in resims for c in validation_cells(d)]
    caps = [json.loads((f / "capacity.json").read_text()) for f in sources]
    closed = [r for d in caps for r in d["rows"] if r["lo"] is not None and r["hi"] is not None]
    points = sum(len(d["points"]) for d in resims)
    summary = {}
    for key, old in (("bundled", "before"), ("refit", "after")):
        counts = cell_counts(cells, key)
        cap_ok = sum(abs(r[f"gap_{old}"]) <= CAPACITY_TARGET for r in closed)
        ranked = sum(d["same_ranking"][old] for d in resims)
        pairs = [sum(d["clear_pairs_same_order"]["all"][old][i] for d in resims) for i in (0, 1)]
        summary[key] = {
            "cells_within_5pts": counts,
            "capacity_within_5pct": [cap_ok, len(closed)],
            "points_same_ranking": [ranked, points],
            "clear_pairs_same_order": pairs,
            "met": {
                "cells": counts["all"]["share"] >= CELL_TARGET,
                "capacity": cap_ok == len(closed),
                "ranking": ranked == points,
            },
        }
    return {
        "about": "issue 28: simulated SLO attainment against the GPU's on replayed windows the pricing was not "
        "fitted on; a cell is one policy at one load of one window; a capacity is a policy's 90%-attainment load, "
        "against the GPU's bracket of replayed loads (closed brackets only)",
        "made_by": "PYTHONPATH=src python3 benchmarks/step_fidelity.py validate --out results/sim-vs-gpu",
        "sources": [str(f) for f in sources],
        "targets": {"cells_within_5pts": CELL_TARGET, "capacity_within": CAPACITY_TARGET, "ranking": "every point"},
        "summary": summary,
        "gpu_repeats": gpu_repeats(replays),
        "cells": cells,
    }


def validation_markdown(doc: dict) -> str:
    lines = [
        "| steps priced by | held-out cells within 5 pts | 1 s / 50 ms | 600-request windows | mean sim - GPU | "
        "capacity within 5% | same ranking | clear pairs in order |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in doc["summary"].items():
        c = s["cells_within_5pts"]
        frac = " | ".join(f"{c[g]['within']}/{c[g]['cells']}" for g in ("all", "conv_1s_50ms", "600_requests"))
        lines.append(
            f"| {key} | {frac} | {c['all']['bias']:+.1f} pts | {s['capacity_within_5pct'][0]}/"
            f"{s['capacity_within_5pct'][1]} | {s['points_same_ranking'][0]}/{s['points_same_ranking'][1]} | "
            f"{s['clear_pairs_same_order'][0]}/{s['clear_pairs_same_order'][1]} |"
        )
    rep = doc["gpu_repeats"]["within_5pts"]
    by_policy = doc["summary"]["refit"]["cells_within_5pts"]["policies"]
    lines += [
        "",
        "Held-out cells within 5 points under the refit, per policy: "
        + ", ".join(f"{p} {c['within']}/{c['cells']}" for p, c in by_policy.items())
        + ".",
        "",
        "The GPU against itself, a point replayed again: within 5 points on the same machine "
        f"{rep['same_machine'][0]}/{rep['same_machine'][1]}, on another machine "
        f"{rep['other_machine'][0]}/{rep['other_machine'][1]}.",
    ]
    return "\n".join(lines) + "\n"


# --- record -------------------------------------------------------------------------------------------------
PROFILE_DIR = Path("src/fairbatching/costmodel/profiles")


def validation_from_resim(
    doc: dict, key: str, held: list[dict], mape: dict, steps: int, planning: str, source: str, fitted: str
) -> dict:
    """A profile's ``fit.validation`` from measured GPU replays: the resimulated cells ``held`` (attainment only:
    resim.json has no simulated P99 TTFT) under ``key`` ("before": bundled pricing, "after": the refit's);
    ``source`` says where they were measured, ``fitted`` what this profile was fitted on."""
    gaps = {c["label"]: [] for c in held}
    for c in held:
        gaps[c["label"]].append(100 * (c[key] - c["gpu"]))
    worst = max(abs(g) for gs in gaps.values() for g in gs)
    within = sum(within_tolerance(c[key], c["gpu"]) for c in held)
    mean = float(np.mean([g for gs in gaps.values() for g in gs]))
    passed = worst <= TOLERANCE_PTS and mape["all"] <= STEP_TOLERANCE
    return {
        "source": f"{source}, recorded by benchmarks/step_fidelity.py record, not by `fairbatching profile`",
        "window": {
            "replays": len(held),
            "windows": sorted({c["scenario"] for c in held}),
            "held_out": f"none of these replays was fitted on ({fitted})",
        },
        "load": f"{', '.join(f'{x:g}x' for x in sorted({c['load'] for c in held}))} the best baseline's simulated "
        "capacity per window (the replays' plan.json)",
        "planning": planning,
        "policies": [
            {
                "policy": p,
                "cells": len(g),
                "max_gap_pts": round(max(g, key=abs), 2),
                "mean_gap_pts": round(float(np.mean(g)), 2),
            }
            for p, g in gaps.items()
        ],
        "step_mape": {**mape, "steps": steps},
        "max_gap_pts": round(worst, 2),
        "passed": passed,
        "verdict": f"{'passed' if passed else 'FAILED'}: simulated SLO attainment within {worst:.1f} points of the GPU "
        f"on {len(held)} held-out replays ({within} within {TOLERANCE_PTS:g}, mean {mean:+.1f}); step-period MAPE "
        f"decode {mape['decode']:.1%}, prefill {mape['prefill']:.1%} (tolerance {STEP_TOLERANCE:.0%} over all steps)",
    }


def record(data: Data, steps: Steps, doc: dict, out: Path) -> None:
    """The data set's two bundled profiles' ``fit.validation`` (the one its policies planned on, and its refit),
    from the replays and steps each was not fitted on."""
    train = steps.of(data.train)
    device = json.loads((data.steps / "replays.jsonl").read_text().splitlines()[0])["device"]
    source = f"measured on an {device} ({data.steps} replays; {out}/resim.json and step_fidelity.md)"
    refit_on = f"this profile was fitted on {calls_label(data.train.calls)} of {data.steps}"
    engine_plans = f"{data.profile} (with online calibration), on the GPU and in the simulator"
    for name, key, held, sel, fitted in (
        (
            data.profile,
            "before",
            doc["cells"],
            np.ones(len(train), bool),
            "this profile's note says what it was fitted on",
        ),
        (data.serving, "after", [c for c in doc["cells"] if not c["fitted_on"]], ~train, refit_on),
    ):
        prof = load_profile(name)
        plan = engine_plans if name == data.profile else f"{engine_plans}; this profile prices the simulated steps"
        check = validation_from_resim(
            doc, key, held, mape_by_kind(prof.cost_model(), steps.select(sel)), int(sel.sum()), plan, source, fitted
        )
        path = PROFILE_DIR / f"{name}.json"
        tmp = path.with_name(path.name + ".tmp")
        replace(prof, fit={**prof.fit, "validation": check}).save(tmp)
        tmp.replace(path)
        print(f"{name}: {check['verdict']}")


def parse_calls(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give call numbers separated by commas") from None


def data_from(args: argparse.Namespace) -> Data:
    """The data set the arguments name, its step logs and profile checked."""
    groups = {f: parse_calls(f"--{f.replace('_', '-')}", getattr(args, f)) for f in ("train", "held_out", "fresh")}
    if not groups["train"] or not groups["held_out"]:
        raise ConfigError("--train and --held-out each need at least one call")
    calls = [c for g in groups.values() for c in g]
    if twice := [c for c in calls if calls.count(c) > 1]:
        raise ConfigError(f"call {twice[0]}: in more than one of --train, --held-out, --fresh")
    data = Data.of(args.steps, args.profile, *groups.values())
    if not args.steps.is_dir():
        raise ConfigError(f"--steps {args.steps}: no such directory (run from the repository root)")
    if missing := [str(p) for p in data.files().values() if not p.is_file()]:
        raise ConfigError(f"step log {missing[0]}: no such file (run from the repository root)")
    load_profile(data.profile)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=("analyse", "fit", "resim", "capacity", "sample", "record", "validate"))
    ap.add_argument("--rows", type=int, default=3000, help="sample: steps in each of the train and held-out files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=Path, default=STEPS, help="folder of the replays.jsonl and steps-call*.csv.gz")
    ap.add_argument("--profile", default=PROFILE, help="the profile the replays' policies planned on")
    ap.add_argument("--train", default=",".join(map(str, TRAIN_CALLS)), help="calls the refit is fitted on")
    ap.add_argument(
        "--held-out", default=",".join(map(str, HELD_OUT_CALLS)), help="calls replayed with the train calls"
    )
    ap.add_argument(
        "--fresh", default=",".join(map(str, FRESH_CALLS)), help="calls replayed after the refit ('': none)"
    )
    ap.add_argument("--pricing", help="resim, capacity: the profile steps are priced by (default: the refit's name)")
    ap.add_argument("--save", type=Path, help="fit: write the fitted profile JSON here")
    ap.add_argument("--noise", type=float, default=0.0, help="resim: per-step log-normal noise on the new pricing")
    ap.add_argument("--cpus", type=int, default=1, help="resim, capacity: simulator processes")
    args = ap.parse_args()
    try:
        data = data_from(args)
        pricing = args.pricing or data.serving
        if args.phase == "record" and (
            missing := [n for n in (data.profile, data.serving) if not (PROFILE_DIR / f"{n}.json").is_file()]
        ):
            raise ConfigError(
                f"--profile {data.profile}: record writes bundled profile files, and {missing[0]} has none"
            )
        if args.phase in ("resim", "capacity"):
            load_profile(pricing)
            if not 0 <= args.noise < 1:
                raise ConfigError(f"--noise {args.noise:g}: give a standard deviation in [0, 1)")
            if not (data.steps / "replays.jsonl").is_file():
                raise ConfigError(f"{data.steps / 'replays.jsonl'}: no such file")
        args.out.mkdir(parents=True, exist_ok=True)
        if args.phase == "validate":
            if missing := [
                *(str(f / n) for f in SOURCES for n in ("resim.json", "capacity.json") if not (f / n).is_file()),
                *(str(f) for f in REPLAYS.values() if not f.is_file()),
            ]:
                raise ConfigError(
                    f"{missing[0]}: no such file (run resim and capacity first, from the repository root)"
                )
            doc = validate(list(SOURCES), read_replays())
            atomic_write_text(args.out / "validation.json", json.dumps(doc, indent=2) + "\n")
            print(validation_markdown(doc))
            return
        if args.phase in ("resim", "capacity"):
            replays = [json.loads(s) for s in (data.steps / "replays.jsonl").read_text().splitlines() if s.strip()]
            if args.phase == "resim":
                doc = resim(replays, data, pricing, args.cpus, args.noise)
                name, text = (
                    f"resim-noise{args.noise:g}.json" if args.noise else "resim.json",
                    resim_markdown(doc, data),
                )
            else:
                doc = capacity(replays, data, pricing, args.cpus)
                name, text = "capacity.json", capacity_markdown(doc)
            tmp = args.out / (name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            tmp.replace(args.out / name)
            print(text)
            return
        steps = read_steps(data.files())
        if args.phase == "record":
            record(data, steps, json.loads((args.out / "resim.json").read_text()), args.out)
            return
        train, held = steps.select(steps.of(data.train)), steps.select(steps.of(data.not_fitted[0]))
        trained = calls_label(data.train.calls)
        refit = f"refit on {trained}"
        command = (
            f"benchmarks/step_fidelity.py fit: the bundled {data.profile} refitted on {trained}'s GPU steps "
            f"({data.steps})"
        )
        prof, report = fit_on(train, data.profile, data.serving, command)
        models = {data.profile: load_profile(data.profile).cost_model(), refit: prof.cost_model()}
        errors, doc = errors_table(models, steps, data)
        if args.phase == "sample":
            write_sample(train, args.rows, args.out / "gpu-steps-train.csv.gz", 0)
            write_sample(held, args.rows, args.out / "gpu-steps-held-out.csv.gz", 1)
            return
        if args.phase == "fit":
            held_out = {
                "steps": len(held.period),
                "from": f"GPU replays not fitted on, {calls_label(data.not_fitted[0].calls)} of {data.steps}: "
                f"{windows(steps, steps.of(data.not_fitted[0]))} ({args.out / 'step_fidelity.md'})",
                "mape": doc[f"{refit} / {data.not_fitted[0].name}"],
            }
            prof = replace(prof, fit={**prof.fit, "held_out_replays": held_out})
            print(errors)
            print(json.dumps(prof.fit, indent=2))
            if args.save:
                tmp = args.save.with_name(args.save.name + ".tmp")
                prof.save(tmp)
                tmp.replace(args.save)
            return
        text = "\n".join(
            [
                "# Step fidelity: measured step periods against the cost model (issue 28)",
                "",
                f"{len(steps.period)} GPU steps of the {len(set(steps.replay))} tail replays "
                f"({data.steps}/steps-call*.csv.gz; policies planning on `{data.profile}`), each at its period "
                "(start to the next step's start; the step alone where the loop idled > "
                f"{IDLE_GAP_S * 1e3:g} ms). The refit is fitted on the train group's steps only. Windows and loads:",
                "",
                *(f"- {g.name}: {windows(steps, steps.of(g))}" for g in data.groups),
                "",
                "| group | calls | replays | steps | of them carrying prefill |",
                "|---|---|---:|---:|---:|",
                *(
                    f"| {g.name} | {', '.join(map(str, g.calls))} | {len(set(steps.replay[steps.of(g)]))} | "
                    f"{int(steps.of(g).sum())} | {int((steps.of(g) & steps.prefill).sum())} |"
                    for g in data.groups
                ),
                "",
                f"    PYTHONPATH=src python3 benchmarks/step_fidelity.py {shlex.join(sys.argv[1:])}",
                "",
                "## Prediction error (mean absolute relative error of the period)",
                "",
                errors,
                "## Features the profile lacks, tried as extra model terms",
                "",
                extension_table(steps, data),
                "## Ratios",
                "",
                ratio_tables(steps, models, data),
            ]
        )
        tmp = args.out / "step_fidelity.md.tmp"
        tmp.write_text(text)
        tmp.replace(args.out / "step_fidelity.md")
        print(text)
    except (ConfigError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
