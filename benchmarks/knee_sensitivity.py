"""How far a step-price error moves SLO attainment near a window's knee: the bound on simulator fidelity.

The simulator is judged cell by cell against GPU replays (issue 28: attainment within 5 points). Near the knee a
cell is only as good as the step prices: this simulates the GPU tail windows with steps carrying prefill
``scale`` x dearer than the policies plan (``StepError.mixed_scale``; also all steps, ``--all-steps``) and prints
attainment per scale, and the points it moves per 1% of step price, beside how far one GPU is from the next
(results/sim-vs-gpu-h100: 2-5% on the same code paths).

  PYTHONPATH=src python3 benchmarks/knee_sensitivity.py --out results/sim-vs-gpu-h100 \\
      --scenarios conv-1s-b,conv-2s-b --loads 0.92,0.96,1.0 --scales 1,1.03,1.056,1.09
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fairbatching.errors import ConfigError
from fairbatching.serving.pricing import StepError
from fairbatching.validate import atomic_write_text, policy_names

sys.path.insert(0, str(Path(__file__).parent))
import gpu_tail  # noqa: E402  (the scenarios and windows of the GPU replays)


def _attainment(job: tuple) -> float:
    scenario, policy, qps, profile, scale, all_steps = job
    error = StepError(scale, 1.0, 0.0) if all_steps else StepError(1.0, scale, 0.0)
    variant = gpu_tail.Variant(policy, policy)
    return gpu_tail.simulate(gpu_tail.SCENARIOS[scenario], variant, qps, profile=profile, step_error=error)["slo"]


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a comma-separated list of numbers") from None
    if not values or any(not 0 < v <= 4 for v in values):
        raise ConfigError(f"{flag} {text!r}: every value must be in (0, 4]")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="writes sensitivity.json here")
    ap.add_argument("--scenarios", default="conv-1s-b,conv-2s-b")
    ap.add_argument("--policies", default="sarathi,vllm,fairbatching")
    ap.add_argument("--loads", default="0.92,0.96,1.0", help="multiples of the plan's baseline capacity")
    ap.add_argument("--scales", default="1,1.03,1.056,1.09", help="step price multipliers; the first is the reference")
    ap.add_argument("--all-steps", action="store_true", help="scale every step, not only those carrying prefill")
    ap.add_argument("--plan", type=Path, default=Path("results/gpu-tail-h100/plan.json"), help="the replays' plan")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if not args.plan.is_file():
        raise ConfigError(f"--plan {args.plan}: no such file")
    plan = json.loads(args.plan.read_text())
    base = {r["scenario"]: r["base_rps"] for r in plan["rows"]}
    scenarios = args.scenarios.split(",")
    for s in scenarios:
        if s not in base:
            raise ConfigError(f"--scenarios {s!r}: not in {args.plan} (has {', '.join(base)})")
    try:
        policies = policy_names(args.policies)
    except ConfigError as exc:
        raise ConfigError(f"--policies {args.policies!r}: {exc}") from None
    loads, scales = _numbers(args.loads, "--loads"), _numbers(args.scales, "--scales")
    cells = [(s, p, round(base[s] * x, 2)) for s in scenarios for x in loads for p in policies]
    jobs = [(s, p, q, plan["profile"], k, args.all_steps) for s, p, q in cells for k in scales]
    print(f"{len(jobs)} simulations on {args.cpus} processes ({plan['profile']})", file=sys.stderr)
    with ProcessPoolExecutor(args.cpus) as pool:
        slo = list(pool.map(_attainment, jobs))
    rows = []
    for i, (s, p, q) in enumerate(cells):
        got = slo[i * len(scales) : (i + 1) * len(scales)]
        per_pct = [(got[0] - g) * 100 / ((k / scales[0] - 1) * 100) for g, k in zip(got[1:], scales[1:], strict=True)]
        rows.append(
            {
                "scenario": s,
                "policy": p,
                "qps": q,
                "slo": dict(zip(map(str, scales), got, strict=True)),
                "points_per_pct": [round(x, 2) for x in per_pct],
            }
        )
    doc = {"profile": plan["profile"], "all_steps": args.all_steps, "scales": scales, "rows": rows}
    atomic_write_text(args.out / "sensitivity.json", json.dumps(doc, indent=1) + "\n")
    what = "every step" if args.all_steps else "steps carrying prefill"
    print(
        f"SLO met with {what} priced x scale; then the points lost per 1% of step price, from the first scale to each\n"
    )
    print("| scenario | req/s | policy | " + " | ".join(f"x{k:g}" for k in scales) + " | points / 1% |")
    print("|---|---:|---|" + "---:|" * len(scales) + "---|")
    for r in rows:
        cells_ = " | ".join(f"{v:.1%}" for v in r["slo"].values())
        print(
            f"| {r['scenario']} | {r['qps']} | {r['policy']} | {cells_} | {', '.join(map(str, r['points_per_pct']))} |"
        )


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
