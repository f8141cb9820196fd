"""How many of node admission's refusals were wrong: each request refused at arrival, admitted instead.

Node admission (``--admission reject``) refuses a request at arrival when the Prefill Admission Budget says its
first token cannot be on time. A refusal is a miss either way; it is a *false* refusal when the request, had it
been admitted, would have met both SLOs. For one gpu_tail scenario and load, on the simulator (policies plan on
the planning profile; steps priced by ``--pricing``, the profile refit on GPU steps, so that the run resembles the
GPU's), this runs FairBatching with admission once, then once more per request refused at arrival with that one
request exempt from the arrival check (it can still be refused later, once its deadline passes while it waits):
whether it met its SLO, and how many requests met theirs in all against the run that refused it.

  PYTHONPATH=src python3 benchmarks/refusal_audit.py --plan results/gpu-tail-h100/plan.json --point conv-2s-b@1.0 \\
      --profile llama-3-8b-h100-engine --pricing llama-3-8b-h100-serving

Prints a table; ``--out`` writes it with every refusal's outcome as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError, ProfileError
from fairbatching.metrics.summary import Summary
from fairbatching.serving.node import REFUSED_OVER_BUDGET, Node

sys.path.insert(0, str(Path(__file__).parent))
import gpu_tail  # noqa: E402  (the scenarios and windows of the GPU replays)

REJECT = gpu_tail.Variant("pab-reject", "fairbatching", admission="reject")


def run(scenario: str, qps: float, profile: str, pricing: str, exempt: str | None = None) -> Summary:
    """FairBatching with node admission on the scenario's window; ``exempt``: a request id that passes the
    arrival check whatever the budget says."""
    exp = gpu_tail.experiment(gpu_tail.SCENARIOS[scenario], REJECT, qps, profile=profile, pricing=pricing)
    if exempt is None:
        return exp.run("fairbatching").summary
    budget = Node._budget

    def lenient(node: Node, r):  # type: ignore[no-untyped-def]
        b = budget(node, r)
        return replace(b, tokens=1 << 40, seconds_per_token=0.0) if r.request_id == exempt else b

    Node._budget = lenient  # this process runs one simulation at a time
    try:
        return exp.run("fairbatching").summary
    finally:
        Node._budget = budget


def _exempt(args: tuple[str, float, str, str, str]) -> dict:
    scenario, qps, profile, pricing, rid = args
    s = run(scenario, qps, profile, pricing, rid)
    (me,) = [m for m in s.per_request if m.request_id == rid]
    return {"request": rid, "met": me.slo_met, "status": me.status, "met_in_all": sum(m.slo_met for m in s.per_request)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, required=True, help="a gpu_tail plan.json: the loads in req/s")
    ap.add_argument("--point", required=True, help="SCENARIO@LOAD, e.g. conv-2s-b@1.0")
    ap.add_argument("--profile", required=True, help="what the policy plans with")
    ap.add_argument("--pricing", required=True, help="what the simulated steps cost")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the audit here as JSON")
    args = ap.parse_args()
    scenario, _, load = args.point.partition("@")
    if scenario not in gpu_tail.SCENARIOS:
        raise ConfigError(f"--point {args.point!r}: unknown scenario {scenario!r}")
    try:
        factor = float(load)
    except ValueError:
        raise ConfigError(f"--point {args.point!r}: give SCENARIO@LOAD, the load a number such as 1.0") from None
    if not args.plan.is_file():
        raise ConfigError(f"--plan {args.plan}: no such file")
    rows = {r["scenario"]: r for r in json.loads(args.plan.read_text())["rows"]}
    if scenario not in rows:
        raise ConfigError(f"--point {args.point!r}: {scenario!r} is not in {args.plan}")
    load_profile(args.profile)
    load_profile(args.pricing)
    qps = round(rows[scenario]["base_rps"] * factor, 2)
    base = run(scenario, qps, args.profile, args.pricing)
    refused = [m.request_id for m in base.per_request if m.reason.startswith(REFUSED_OVER_BUDGET)]
    met = sum(m.slo_met for m in base.per_request)
    with ProcessPoolExecutor(args.cpus) as pool:
        audits = list(pool.map(_exempt, [(scenario, qps, args.profile, args.pricing, rid) for rid in refused]))
    false = [a for a in audits if a["met"]]
    doc = {
        "point": args.point,
        "qps": qps,
        "profile": args.profile,
        "pricing": args.pricing,
        "requests": base.requests,
        "met": met,
        "refused_at_arrival": len(refused),
        "would_have_met": len(false),
        "net_met_if_admitted": [a["met_in_all"] - met for a in audits],
        "audits": audits,
    }
    if args.out:  # whole or not at all
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(args.out)
    net = doc["net_met_if_admitted"]
    print("| point | req/s | requests | SLO met | refused at arrival | would have met if admitted | net met, mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.point} | {qps} | {base.requests} | {met} | {len(refused)} | {len(false)} | "
        f"{(sum(net) / len(net) if net else 0.0):+.2f} |"
    )


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
