"""benchmarks/gpu_tail.py: the variant and job syntax, the report's comparisons against the best baseline and
its targets, and (with torch) the whole driver end to end on a CPU engine: run, resume, report."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fairbatching.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_tail", ROOT / "benchmarks" / "gpu_tail.py")
assert _spec is not None and _spec.loader is not None
gpu_tail = importlib.util.module_from_spec(_spec)
sys.modules["gpu_tail"] = gpu_tail
_spec.loader.exec_module(gpu_tail)


def _row(label, load, slo, p99, policy=None, scenario="conv-2s"):
    return {
        "scenario": scenario,
        "load": load,
        "qps": 20.0 * load,
        "label": label,
        "policy": policy or label,
        "options": {},
        "window": {"requests": 600, "start": 9000, "seed": 0},
        "gpu": {"slo": slo, "ttft_p50": 0.5, "ttft_p99": p99, "tbt_p99": 0.1, "refused": 0},
        "wall_s": 30.0,
    }


def test_variants_and_jobs_parse_or_name_the_bad_part():
    v = gpu_tail.parse_variant("fb-age3:fairbatching:late_age_limit=3,late_last=true")
    assert (v.label, v.policy, dict(v.options)) == ("fb-age3", "fairbatching", {"late_age_limit": 3, "late_last": True})
    assert gpu_tail.parse_variant("plain:sarathi").options == ()
    with pytest.raises(ConfigError, match="LABEL:POLICY"):
        gpu_tail.parse_variant("fairbatching")
    with pytest.raises(ConfigError, match="unknown option"):
        gpu_tail.parse_variant("x:fairbatching:no_such_option=1")
    with pytest.raises(ConfigError, match="late_age_limit"):
        gpu_tail.parse_variant("x:fairbatching:late_age_limit=-1")
    job = gpu_tail.parse_job("code@1.0,1.3=fairbatching,sarathi", ["fairbatching", "sarathi", "vllm"])
    assert (job.scenario, job.loads, job.labels) == ("code", (1.0, 1.3), ("fairbatching", "sarathi"))
    assert gpu_tail.parse_job("conv-1s", ["fairbatching"]).loads == gpu_tail.LOADS
    bad_jobs = [("nope", "unknown scenario"), ("code@4.5", "load 4.5"), ("code@0", "load 0.0")]
    bad_jobs += [("code@x", "not numbers"), ("code=edf", "policy 'edf'")]
    for bad, message in bad_jobs:
        with pytest.raises(ConfigError, match=message):
            gpu_tail.parse_job(bad, ["fairbatching"])


def test_a_row_is_simulated_with_the_config_it_ran_not_todays_defaults():
    old = {**_row("fairbatching", 1.0, 0.9, 1.0), "options": {"late_age_limit": 3}}
    assert dict(gpu_tail.row_variant(old).options) == {"late_age_limit": 3, "queue_margin": None}
    assert dict(gpu_tail.row_variant(_row("sarathi", 1.0, 0.9, 1.0)).options) == {}
    recorded = {**old, "config": {"queue_margin": 0.5, "late_age_limit": 3, "tpot_slo": 0.1}}
    assert dict(gpu_tail.row_variant(recorded).options) == {"late_age_limit": 3, "queue_margin": 0.5}
    chosen = {**recorded, "options": {"tpot_slo": 0.05}, "config": {**recorded["config"], "tpot_slo": 0.05}}
    assert dict(gpu_tail.row_variant(chosen).options)["tpot_slo"] == 0.05  # the variant's TPOT, not the scenario's


def test_a_capacity_bracket_holds_only_the_rows_that_ran_as_the_last_replay():
    # The default before queue feasibility (no recorded config) at 1.0x, 1.15x and 1.3x, missed at 1.3x; then the
    # default after it replayed 1.0x and 1.15x again: the last replay decides, not the order points first came.
    before = [_row("fairbatching", x, ok, 9.0) for x, ok in ((1.0, 0.95), (1.15, 0.95), (1.3, 0.5))]
    after = [{**_row("fairbatching", x, 0.95, 2.0), "config": {"queue_margin": 0.5}} for x in (1.0, 1.15)]
    vllm_old, vllm_new = _row("vllm", 0.9, 0.95, 1.0), {**_row("vllm", 1.0, 0.5, 3.0), "config": {"max_num_seqs": 256}}
    rows = gpu_tail.as_last_replayed([*before, vllm_old, *after, vllm_new])
    assert rows == [*after, vllm_old, vllm_new]  # vLLM's policy ran the same throughout
    fb = next(b for b in gpu_tail.capacity_brackets(rows) if b["label"] == "fairbatching")
    assert (fb["lo"], fb["hi"]) == (23.0, None)


def test_jobs_follow_the_selections_order_and_price_each_replay_from_the_plan():
    plan = {"rows": [{"scenario": "code", "base_rps": 10.0, "span_s": {"fairbatching@1.0": 20.0, "vllm@1.15": 30.0}}]}
    variants = [gpu_tail.Variant("fairbatching", "fairbatching"), gpu_tail.Variant("fb-x", "fairbatching")]
    variants.append(gpu_tail.Variant("vllm", "vllm"))
    sel = gpu_tail.Selection("code", (1.15, 1.0), ("fairbatching", "vllm"))
    got = [(j.load, j.qps, j.variant.label, j.est_s) for j in gpu_tail.jobs(plan, [sel], variants)]
    overhead = gpu_tail.REPLAY_OVERHEAD_S
    assert got == [
        (1.15, 11.5, "fairbatching", 30.0 + overhead),  # no span for this load: the plan's longest
        (1.15, 11.5, "vllm", 30.0 + overhead),
        (1.0, 10.0, "fairbatching", 20.0 + overhead),
        (1.0, 10.0, "vllm", 30.0 + overhead),
    ]


def test_the_best_baseline_is_the_one_meeting_most_slos_and_targets_follow_the_load():
    rows = [
        _row("sarathi", 1.0, 0.80, 3.0),
        _row("vllm", 1.0, 0.78, 2.0),
        _row("fairbatching", 1.0, 0.86, 2.3),  # +6 pts, P99 0.77x sarathi's
        _row("fb-age3", 1.0, 0.84, 2.0, "fairbatching"),  # +4 pts: misses the attainment target
    ]
    by = {c["label"]: c for c in gpu_tail.compare_point(rows)}
    assert by["fairbatching"]["best_baseline"] == "sarathi"
    assert by["fairbatching"]["slo_delta_pts"] == 6.0 and by["fairbatching"]["ttft_p99_ratio"] == 0.77
    assert by["fairbatching"]["met"] is True
    assert by["fb-age3"]["targets"] == {"slo_plus_5pts": False, "ttft_p99_le_0.8x": True}
    assert by["fb-age3"]["met"] is False
    at_115 = gpu_tail.compare_point([_row("vllm", 1.15, 0.6, 4.0), _row("fairbatching", 1.15, 0.7, 4.4)])
    assert at_115[0]["targets"] == {"ttft_p99_le_1.0x": False}
    tie = gpu_tail.compare_point(
        [_row("sarathi", 1.3, 0.5, 5.0), _row("vllm", 1.3, 0.5, 4.0), _row("fairbatching", 1.3, 0.6, 4.0)]
    )
    assert tie[0]["best_baseline"] == "vllm" and tie[0]["met"] is None  # no target at 1.3x
    assert gpu_tail.compare_point([_row("fairbatching", 1.0, 0.9, 1.0)]) == []


def test_a_baseline_with_our_admission_is_a_variant_not_the_reference():
    rows = [
        _row("vllm", 1.0, 0.70, 1.0),
        _row("sarathi-reject", 1.0, 0.75, 0.9, "sarathi"),
        _row("fairbatching", 1.0, 0.90, 1.2),
    ]
    (fb,) = [c for c in gpu_tail.compare_point(rows) if c["label"] == "fairbatching"]
    assert fb["best_baseline"] == "vllm" and fb["slo_delta_pts"] == 20.0


def test_mixed_slo_classes_compare_the_tightest_class_tail_beside_the_pooled_one():
    def classes(tight_p99, relaxed_p99):
        return [
            {"ttft_slo": 0.5, "tpot_slo": 0.05, "requests": 50, "slo": 0.9, "ttft_p50": 0.1, "ttft_p99": tight_p99},
            {"ttft_slo": 8.0, "tpot_slo": 0.2, "requests": 50, "slo": 1.0, "ttft_p50": 0.2, "ttft_p99": relaxed_p99},
        ]

    base, fb = _row("vllm", 1.0, 0.85, 1.0), _row("fairbatching", 1.0, 0.95, 2.0)
    base["gpu"]["classes"], fb["gpu"]["classes"] = classes(1.0, 1.0), classes(0.4, 2.0)
    (c,) = [c for c in gpu_tail.compare_point([base, fb]) if c["label"] == "fairbatching"]
    assert c["ttft_p99_ratio"] == 2.0 and c["tightest_class_ttft_p99_ratio"] == 0.4
    assert c["met"] is False  # the targets stay on the pooled tail
    table = gpu_tail.markdown(gpu_tail.build_report([base, fb], {}))
    assert "| +10.0 | 2.00x | 0.40x |" in table and "| fairbatching | 0.5 s / 50 ms | 50 | 90.0% | - |" in table


def test_capacity_brackets_bound_the_lead_by_the_best_plain_baseline():
    rows = [
        _row("vllm", 0.9, 0.95, 1.0),  # vllm's capacity in [18, 20) req/s
        _row("vllm", 1.0, 0.80, 1.0),
        _row("sarathi", 0.9, 0.85, 1.0),  # sarathi's below 18
        _row("sarathi-reject", 1.2, 0.50, 1.0, "sarathi"),  # may reach 24, but is not what users run
        _row("fairbatching", 1.1, 0.92, 1.0),  # FairBatching's in [22, 24)
        _row("fairbatching", 1.2, 0.85, 1.0),
        _row("fb-x", 1.0, 0.91, 1.0, "fairbatching"),  # [20, ?)
    ]
    by = {c["label"]: c for c in gpu_tail.capacity_brackets(rows)}
    assert (by["vllm"]["lo"], by["vllm"]["hi"]) == (18.0, 20.0)
    assert (by["sarathi"]["lo"], by["sarathi"]["hi"]) == (None, 18.0)
    fb = by["fairbatching"]
    assert fb["best_baseline"] == "vllm" and (fb["lo"], fb["hi"]) == (22.0, 24.0)
    assert fb["lead_at_least"] == pytest.approx(1.1) and fb["lead_at_most"] == pytest.approx(24 / 18)
    assert fb["met"] is True
    assert by["fb-x"]["lead_at_least"] == 1.0 and by["fb-x"]["lead_at_most"] is None and by["fb-x"]["met"] is None
    slow = gpu_tail.capacity_brackets([_row("vllm", 1.0, 0.95, 1.0), _row("fairbatching", 1.05, 0.80, 1.0)])
    assert {c["label"]: c for c in slow}["fairbatching"]["met"] is False  # at most 21 / 20 = 1.05x


def test_report_takes_the_last_replay_of_a_point_and_marks_targets_in_the_table():
    first = _row("fairbatching", 1.0, 0.50, 9.0)
    stale = _row("fairbatching", 1.3, 0.50, 9.0)  # the default before queue feasibility: not in the bracket
    again = {**_row("fairbatching", 1.0, 0.95, 1.0), "config": {"queue_margin": 0.5}}
    base = _row("sarathi", 1.0, 0.85, 2.0)
    sims = {gpu_tail.row_key(base): {"slo": 0.9, "ttft_p99": 1.5}}
    doc = gpu_tail.build_report([first, stale, base, again], sims)
    fb = next(b for b in doc["capacity"] if b["label"] == "fairbatching")
    assert (fb["lo"], fb["hi"]) == (20.0, None)
    doc["points"] = [p for p in doc["points"] if p["load"] == 1.0]
    (point,) = doc["points"]
    assert [r["gpu"]["slo"] for r in point["policies"]] == [0.95, 0.85]
    assert point["policies"][1]["sim"]["slo"] == 0.9 and point["policies"][0]["sim"] is None
    table = gpu_tail.markdown(doc)
    assert "| conv-2s | 1.0x | 20.0 | fairbatching | 95.0% | - | 0.50 | 1.00 |" in table
    assert (
        "| conv-2s | 1.0x | fairbatching | sarathi | +10.0 | 0.50x | - | slo_plus_5pts, ttft_p99_le_0.8x | met |"
        in table
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the engine needs the [gpu] extra (torch)")
def test_driver_end_to_end_on_a_cpu_engine_runs_resumes_and_reports(tmp_path):
    def tail(*args):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_tail.py"), *args, "--out", str(tmp_path)]
        cmd += ["--plan", str(ROOT / "results" / "gpu-tail" / "plan.json")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    common = ["--device", "cpu", "--tiny", "--variant", "fb-age3:fairbatching:late_age_limit=3"]
    res = tail("run", *common, "--job", "code@1.0=fairbatching,fb-age3")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "plan: 2 replays to run (0 done before)" in res.stdout
    res = tail("run", *common, "--job", "code@1.0=fairbatching,fb-age3,sarathi")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "plan: 1 replays to run (2 done before)" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "replays.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["fairbatching", "fb-age3", "sarathi"]
    assert rows[1]["options"] == {"late_age_limit": 3} and all(r["gpu"]["requests"] == 6 for r in rows)
    assert rows[1]["config"]["late_age_limit"] == 3 and rows[0]["config"]["queue_margin"] == 0.5
    with gzip.open(tmp_path / "steps.csv.gz", "rt") as f:
        steps = list(csv.DictReader(f))
    for r in rows:  # one line per executed step, in start order, each saying how it ran
        mine = [s for s in steps if s["label"] == r["label"]]
        assert len(mine) == r["steps"]
        assert [float(s["start"]) for s in mine] == sorted(float(s["start"]) for s in mine)
        assert {s["path"] for s in mine} <= {"eager", "piecewise", "decode-graph", "mixed-graph"}
        assert any(int(s["prefill_chunks"]) for s in mine) and any(not int(s["prefill_chunks"]) for s in mine)
    res = tail("report", "--cpus", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    doc = json.loads((tmp_path / "tail.json").read_text())
    assert {c["label"] for c in doc["points"][0]["vs_best_baseline"]} == {"fairbatching", "fb-age3"}
    assert all(r["sim"]["requests"] == 6 for r in doc["points"][0]["policies"])
    assert "| code | 1.0x |" in (tmp_path / "README.md").read_text()
    res = tail("run", "--budget-s", "0", "--job", "nope")
    assert res.returncode == 2 and "unknown scenario 'nope'" in res.stderr


def test_plan_refuses_to_mix_profiles_in_one_plan(tmp_path):
    """A plan's loads are one profile's capacities: planning other scenarios into it on another profile would
    put two GPUs' loads in one table, so it is a one-line error, exit 2, and the plan is left as it was."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"profile": "llama-3-8b-h200-engine", "rows": []}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_tail.py"), "plan", "--out", str(tmp_path)]
    cmd += ["--profile", "llama-3-8b-h100-engine", "--scenarios", "code-b"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "plans on llama-3-8b-h200-engine, not --profile llama-3-8b-h100-engine" in done.stderr
    assert json.loads(plan.read_text()) == {"profile": "llama-3-8b-h200-engine", "rows": []}


def test_plan_writes_each_scenarios_capacities_and_replay_spans(tmp_path):
    """The plan phase simulates each policy's capacity on the scenario and every load's span (what `run` budgets
    by), on the profile named; a row for another scenario already in the plan is kept."""
    kept = {"scenario": "conv-1s-b", "base_rps": 1.0}
    (tmp_path / "plan.json").write_text(json.dumps({"profile": "llama-3-8b-h100-engine", "rows": [kept]}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_tail.py"), "plan", "--out", str(tmp_path), "--cpus", "1"]
    cmd += ["--profile", "llama-3-8b-h100-engine", "--scenarios", "code-b"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["profile"] == "llama-3-8b-h100-engine"
    assert doc["rows"][0] == kept
    row = doc["rows"][1]
    assert row["scenario"] == "code-b"
    assert row["base_rps"] == row["sim_capacity_rps"][row["base_policy"]] > 0
    assert set(row["span_s"]) == {f"{p}@{f}" for p in ("fairbatching", "sarathi", "vllm") for f in doc["loads"]}
    assert all(span > 0 for span in row["span_s"].values())


def test_a_plan_made_on_another_gpu_models_profile_is_refused_on_this_one():
    """The H100 plan's loads on an H200 (or the reverse) would be another load in the wrong GPU's table: run says
    so before any replay (``_check_device`` raises it as a one-line error, exit 2) unless --any-gpu."""
    h100 = ROOT / "results" / "gpu-tail-h100" / "plan.json"
    h200 = ROOT / "results" / "gpu-tail" / "plan.json"
    assert gpu_tail.plan_gpu_mismatch(h100, "NVIDIA H100 80GB HBM3") is None
    assert gpu_tail.plan_gpu_mismatch(h200, "NVIDIA H200") is None
    problem = gpu_tail.plan_gpu_mismatch(h100, "NVIDIA H200")
    assert problem and "plans on llama-3-8b-h100-engine, measured on NVIDIA H100 80GB HBM3" in problem
    assert "this GPU is NVIDIA H200" in problem and "--any-gpu" in problem
    assert gpu_tail.plan_gpu_mismatch(h200, "NVIDIA H100 80GB HBM3")
