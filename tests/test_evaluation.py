import json
from types import SimpleNamespace

import pytest

from fairbatching.costmodel import load_profile
from fairbatching.costmodel.profile import DEFAULT_PROFILE
from fairbatching.errors import ConfigError
from fairbatching.evaluation import Sweeper, find_capacity
from fairbatching.evaluation import sweep as sweep_mod
from fairbatching.evaluation.bounds import clairvoyant_capacity
from fairbatching.runs import ClusterShape, Experiment, RunResult, RunSpec
from fairbatching.workloads.families import family


class StepSweeper:
    """Stands in for the simulator in the search: attainment is 0.99 up to a known capacity, then 0.5."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.calls: list[float] = []

    def run(self, specs, progress=None):
        out = []
        for s in specs:
            self.calls.append(s.qps)
            ok = 0.99 if s.qps <= self.capacity else 0.5
            summary = SimpleNamespace(slo_attainment=ok, tpot_attainment=ok, ttft=SimpleNamespace(p99=1.0 / ok))
            out.append(RunResult(s, summary))
        return out


@pytest.mark.parametrize("true_capacity,start", [(7.3, 4.0), (7.3, 40.0), (0.37, 4.0)])
def test_capacity_search_brackets_then_bisects_to_tolerance(true_capacity, start):
    sweeper = StepSweeper(true_capacity)
    res = find_capacity(RunSpec("vllm", "default", 1.0), sweeper, target=0.9, seeds=2, start_qps=start, tolerance=0.01)
    assert true_capacity / 1.01 <= res.capacity_qps <= true_capacity
    assert res.bracket[1] / res.bracket[0] - 1 <= 0.01
    assert [p.qps for p in res.curve] == sorted(p.qps for p in res.curve)
    assert len(sweeper.calls) == 2 * len(res.curve)  # every point ran all seeds


def test_capacity_rejects_bad_settings():
    with pytest.raises(ConfigError):
        find_capacity(RunSpec("vllm", "default", 1.0), StepSweeper(1), target=1.5)


def test_real_capacity_search_is_consistent_with_its_curve(tmp_path):
    base = RunSpec("fairbatching", "default", 1.0, num_requests=150)
    res = find_capacity(base, Sweeper(tmp_path, workers=1), seeds=1, start_qps=8, tolerance=0.1)
    at = {p.qps: p.attainment for p in res.curve}
    assert at[res.bracket[0]] >= 0.9 > at[res.bracket[1]]
    assert res.capacity_qps > 0


def test_sweep_caches_and_resumes(tmp_path, monkeypatch):
    calls = []
    real = sweep_mod.run_for_cache

    def counting(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(sweep_mod, "run_for_cache", counting)
    specs = [RunSpec(p, "default", 10.0, num_requests=80) for p in ("fairbatching", "vllm")]
    first = Sweeper(tmp_path, workers=1).run(specs + specs[:1])
    assert len(calls) == 2 and len(first) == 3 and first[0] == first[2]
    again = Sweeper(tmp_path, workers=1).run(specs)
    assert len(calls) == 2 and again == first[:2]
    (tmp_path / f"{specs[1].key()}.json").write_text('{"cut short')  # an interrupted write
    Sweeper(tmp_path, workers=1).run(specs)
    assert [s.policy for s in calls] == ["fairbatching", "vllm", "vllm"]


def test_cache_key_follows_the_profile_content(tmp_path):
    """A profile remeasured under the same name must not reuse results simulated with the old numbers."""
    from fairbatching.runs import _profile_fingerprint

    path = tmp_path / "mine.json"
    load_profile().save(path)
    specs = (
        RunSpec("fairbatching", "default", 10.0, profile=str(path)),
        RunSpec("fairbatching", "default", 40.0, num_requests=4000, profile=str(path), cluster=ClusterShape()),
    )
    before = [s.key() for s in specs]
    assert before == [s.key() for s in specs]  # stable for the same content
    data = json.loads(path.read_text())
    data["params"]["t_mixed"] *= 2
    path.write_text(json.dumps(data))
    _profile_fingerprint.cache_clear()  # a new process (the next `evaluate`) reads the file afresh
    after = [s.key() for s in specs]
    assert after[0] != before[0] and after[1] != before[1]


def test_parallel_sweep_matches_serial(tmp_path):
    specs = [RunSpec("fairbatching", "default", q, num_requests=80) for q in (6.0, 12.0, 18.0)]
    serial = Sweeper(None, workers=1).run(specs)
    parallel = Sweeper(None, workers=2).run(specs)
    assert [r.summary for r in serial] == [r.summary for r in parallel]


def test_sweep_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="needs the [ray] extra (ray)")
    specs = [RunSpec(p, "default", 12.0, num_requests=60) for p in ("fairbatching", "sarathi")]
    try:
        got = Sweeper(tmp_path, workers=1, ray_address="local").run(specs)
    finally:
        ray.shutdown()
    assert [r.spec.policy for r in got] == ["fairbatching", "sarathi"]
    assert got == Sweeper(None, workers=1).run(specs)


def test_clairvoyant_bound_is_above_what_any_policy_achieves():
    prof = load_profile()
    w = family("default").build(60.0, 0, 500)  # far past capacity: the GPU never idles
    bound = clairvoyant_capacity(w, prof)
    for policy in ("fairbatching", "vllm", "prefill-first"):
        res = Experiment(w, prof).run(policy).summary
        achieved = len(w) / res.duration_s
        assert achieved <= bound
        assert bound < 3 * achieved  # and not uselessly loose


def test_trace_family_seeds_pick_different_windows():
    fam = family("azure-conv")
    a, b = fam.build(5.0, 0, 300), fam.build(5.0, 1, 300)
    assert a.meta["start"] == 0 and b.meta["start"] > 0
    assert a.qps == pytest.approx(5.0) and b.qps == pytest.approx(5.0)
    assert [r.prompt_len for r in a.requests] != [r.prompt_len for r in b.requests]


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown workload 'nope'"):
        family("nope")


def test_sweep_and_capacity_cli(tmp_path):
    from test_cli import cli

    out, cache = tmp_path / "sweep", tmp_path / "cache"
    res = cli(
        "sweep",
        "-n",
        "80",
        "--qps",
        "6,12",
        "--policies",
        "fairbatching,vllm",
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--workers",
        "1",
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "sweep.json").read_text())
    assert len(data) == 4 and (out / "curves_default_2_0.1.png").stat().st_size > 0
    assert len(list(cache.glob("*.json"))) == 4
    res = cli(
        "capacity",
        "-n",
        "80",
        "--seeds",
        "1",
        "--tolerance",
        "0.25",
        "--policies",
        "vllm",
        "--cache",
        str(cache),
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert "clairvoyant" in res.stdout
    cap = json.loads((tmp_path / "capacity.json").read_text())
    assert cap["results"][0]["capacity_qps"] > 0
    bad = cli("sweep", "--slos", "2-0.1")
    assert bad.returncode == 2 and "TTFT:TPOT pairs" in bad.stderr


def test_evaluate_cli_writes_tables_and_plots(tmp_path):
    from test_cli import cli

    res = cli(
        "evaluate",
        "--scenarios",
        "default:2:0.1:8",
        "-n",
        "100",
        "--seeds",
        "1",
        "--tolerance",
        "0.3",
        "--policies",
        "fairbatching,sarathi",
        "--workers",
        "1",
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "ev"),
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert [r["policy"] for r in rows] == ["fairbatching", "sarathi"] and all(r["capacity_qps"] > 0 for r in rows)
    for name in (
        "evaluation.md",
        "report.html",
        "curves_default_2_100ms.png",
        "cdfs_default_2_100ms.png",
        "slack_default_2_100ms.png",
    ):
        assert (tmp_path / "ev" / name).stat().st_size > 0, name
    bad = cli("evaluate", "--scenarios", "default:fast")
    assert bad.returncode == 2 and "workload:TTFT:TPOT:start_qps" in bad.stderr


def test_capacity_search_reports_the_load_it_tries():
    seen = []
    res = find_capacity(
        RunSpec("vllm", "default", 1.0),
        StepSweeperWithProgress(3.0),
        seeds=2,
        start_qps=4.0,
        tolerance=0.1,
        progress=lambda q, d, t: seen.append((q, d, t)),
    )
    announced = [q for q, d, _ in seen if d == 0]  # each point named before its runs start
    assert sorted(announced) == [p.qps for p in res.curve] and len(res.curve) > 3
    assert all(t == 2 and 0 <= d <= 2 for _, d, t in seen)


class StepSweeperWithProgress(StepSweeper):
    def run(self, specs, progress=None):
        out = []
        for i, s in enumerate(specs):
            if progress:
                progress(i, len(specs))
            out.extend(super().run([s]))
        if progress:
            progress(len(specs), len(specs))
        return out


def test_evaluate_says_which_scenario_policy_and_load_it_runs(tmp_path):
    from dataclasses import replace

    from fairbatching.evaluation.evaluate import Scenario, equal_load_plots, evaluate, scenario_spec

    seen = []
    status = lambda what, done, total: seen.append((what, done, total))  # noqa: E731
    sc = Scenario("azure-code", 2.0, 0.1, 2.0)
    rows = evaluate([sc], ["vllm"], Sweeper(tmp_path / "c", workers=1), tmp_path, 60, 1, 0.9, 0.4, status=status)
    at = replace(scenario_spec(sc, "vllm", 60, None), qps=rows[0]["equal_load_qps"])
    equal_load_plots(sc, at, ["vllm"], tmp_path, status=status)
    whats = [w for w, _, _ in seen]
    assert "[1/1] azure-code 2s/100ms capacity vllm @ 2.00 req/s" in whats  # scenario, policy, load
    assert any(w.startswith("[1/1] azure-code 2s/100ms curves, 1 policies x") for w in whats)
    assert any(w.startswith("azure-code plots vllm @ ") for w in whats)
    assert all(total is None or 0 <= done <= total for _, done, total in seen)


def test_a_capacity_no_load_failed_is_printed_as_a_lower_bound():
    import math

    from fairbatching.evaluation.capacity import CapacityResult, capacity_lines

    open_ended = CapacityResult("vllm", "w", 64.0, 0.9, 0.02, (64.0, math.inf))
    bracketed = CapacityResult("sarathi", "w", 12.0, 0.9, 0.02, (12.0, 12.2))
    lines = capacity_lines([open_ended, bracketed], None, 10)
    assert "lower bound" in lines[0] and "lower bound" not in lines[1]


def test_capacity_cli_searches_behind_node_admission(tmp_path):
    """`capacity --admission reject`: every run of the search is behind the node's admission, which refuses at
    the overloaded loads (counted as missed), and capacity.json says so; a bad mode is one line, exit 2."""
    from test_cli import cli

    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ("capacity", "-n", "80", "--seeds", "1", "--tolerance", "0.25", "--policies", "fairbatching")
    res = cli(*args, "--admission", "reject", "--cache", str(cache), "--workers", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "behind node admission reject" in res.stdout
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["admission"] == "reject"
    check = load_profile(DEFAULT_PROFILE).fit["validation"]["verdict"]  # how far to trust it, as the profile records
    assert doc["profile_check"] == f"profile {DEFAULT_PROFILE} against the GPU, as recorded: {check}"
    assert doc["profile_check"] in " ".join(res.stdout.split())
    runs = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert runs and {r["spec"]["admission"] for r in runs} == {"reject"}
    assert any(r["summary"]["rejected"] > 0 for r in runs if r["spec"]["qps"] > doc["results"][0]["capacity_qps"])
    bad = cli(*args, "--admission", "maybe", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "'maybe'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
