"""The run layer's GPU backend (``--backend gpu``) end to end on CPU engines (tiny model), and its caching."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

from fairbatching.core.backend import Backend, EngineSpec
from fairbatching.costmodel.model import CostModel
from fairbatching.errors import ConfigError, FairBatchingError
from fairbatching.evaluation.sweep import Sweeper
from fairbatching.policies import make_policy
from fairbatching.runs import RunSpec
from fairbatching.serving.pricing import pricing_model
from fairbatching.serving.simulator import NodeConfig, simulate

ENGINE = EngineSpec("tiny", max_context=1024, num_blocks=200, device="cpu", hardware="cpu")
CPU_ENGINE_ARGS = ["--device", "cpu", "--model", "tiny", "--num-blocks", "200", "--max-context", "1024"]


def short_trace(path, n: int = 12) -> str:
    """An Azure-format trace of short requests (a CPU engine serves each in well under a second)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for i in range(n):
            w.writerow([f"2023-11-16 18:17:{i:02d}", 16 + 5 * i, 2 + i % 3])
    return str(path)


def shared_prefix_trace(path, n: int = 6) -> str:
    """A Mooncake-format trace (0.5 s apart) whose prompts share their first 512-token block, then differ: with
    prefix caching a later prompt finds that block cached (about 90% of its tokens)."""
    rows = [
        {"timestamp": 500 * i, "input_length": 560 + 8 * i, "output_length": 2, "hash_ids": [1, 10 + i]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class SimulatedEngines:
    """Stands in for ``EngineCluster`` (no torch): replays each job on the simulator, slowed tenfold, so a
    'measured' result differs from its simulated twin."""

    def __init__(self) -> None:
        self.jobs = 0

    def replay_each(self, jobs, progress=None, on_result=None):
        results = []
        for i, job in enumerate(jobs):
            self.jobs += 1
            cost = job.profile.cost_model()
            params = job.profile.params
            slow = CostModel(replace(params, t_fixed=10 * params.t_fixed, c_tok=10 * params.c_tok))
            policy = make_policy(job.policy, cost, tpot_slo=job.slo.tpot, **dict(job.options))
            res = simulate(policy, pricing_model(slow, None), job.workload, NodeConfig(job.slo, job.profile.kv))
            if on_result is not None:
                on_result(i, res)
            results.append(res)
        return results


def test_a_gpu_spec_needs_its_engine_and_keys_apart_from_the_simulator():
    sim = RunSpec("fairbatching", "default", 10.0, num_requests=20)
    with pytest.raises(ConfigError, match="needs its engine"):
        RunSpec("fairbatching", "default", 10.0, backend="gpu")
    with pytest.raises(ConfigError, match="backend must be sim or gpu, got 'tpu'"):
        RunSpec("fairbatching", "default", 10.0, backend="tpu")
    gpu = replace(sim, backend=Backend.GPU, engine=ENGINE)
    h200 = replace(gpu, engine=replace(ENGINE, hardware="NVIDIA H200"))
    assert len({sim.key(), gpu.key(), h200.key()}) == 3
    assert gpu.simulated().backend is Backend.SIM and gpu.simulated().key() != sim.key()  # the engine's context


def test_gpu_results_carry_the_simulator_beside_them_and_are_cached_as_they_end(tmp_path):
    engines = SimulatedEngines()
    base = RunSpec("fairbatching", "default", 10.0, num_requests=30, backend="gpu", engine=ENGINE)
    specs = [replace(base, seed=s) for s in range(3)]
    first = Sweeper(tmp_path, workers=1, engines=engines).run(specs)
    assert engines.jobs == 3
    for r in first:
        assert r.sim is not None and r.summary.requests == r.sim.requests == 30
        assert r.summary.ttft.p50 > r.sim.ttft.p50  # measured (10x slower steps here) vs the simulator's
    again = Sweeper(tmp_path, workers=1).run(specs)  # no engines: everything comes from the cache
    assert [r.summary for r in again] == [r.summary for r in first]
    assert [r.sim for r in again] == [r.sim for r in first]


def test_compare_on_the_gpu_backend_with_cpu_engines(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    out = tmp_path / "cmp"
    args = ["compare", "--backend", "gpu", *CPU_ENGINE_ARGS, "--trace", short_trace(tmp_path / "t.csv"), "--qps", "20"]
    res = CliRunner().invoke(app, [*args, "--policies", "fairbatching,vllm", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "summary.json").read_text())
    assert doc["backend"]["name"] == "gpu" and doc["backend"]["engine"]["model"] == "tiny"
    assert [r["policy"] for r in doc["results"]] == ["fairbatching", "vllm"]
    for r in doc["results"]:
        assert r["requests"] == r["finished"] == 12 and r["sim"]["requests"] == 12
    for name in ("summary.csv", "summary.md", "requests_vllm.csv", "compare.png", "report.html"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "sim_vs_gpu.csv").open()))
    assert [r["policy"] for r in rows] == ["fairbatching", "vllm"] and "slo_attainment_sim" in rows[0]
    assert "measured / simulated" in (out / "summary.md").read_text()
    assert "planning with profile" in res.output


def test_capacity_on_the_gpu_backend_with_cpu_engines(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    trace = short_trace(tmp_path / "t.csv", 40)
    args = ["capacity", "--backend", "gpu", *CPU_ENGINE_ARGS, "-w", trace, "-n", "6", "--seeds", "2"]
    args += ["--policies", "vllm", "--tolerance", "0.5", "--cache", str(tmp_path / "cache"), "--workers", "1"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cap")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    (row,) = doc["results"]
    assert doc["backend"]["name"] == "gpu" and row["backend"] == "gpu" and row["sim_capacity_qps"] > 0
    assert row["curve"] and all(p["sim_attainment"] is not None for p in row["curve"])
    assert row["curve"][0]["qps"] <= row["sim_capacity_qps"] <= row["curve"][-1]["qps"]  # the GPU began there
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    on_gpu = [c for c in cached if c["spec"].get("backend") == "gpu"]
    assert on_gpu and all("sim" in c and c["spec"]["seed"] >= 1 for c in on_gpu)  # seed 0: the calibration window


def test_cluster_on_the_gpu_backend_runs_one_cpu_engine_per_node(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    args = ["cluster", "--backend", "gpu", *CPU_ENGINE_ARGS, "--nodes", "2", "-w", short_trace(tmp_path / "t.csv")]
    args += ["-n", "12", "--qps", "20", "--pairs", "vllm:round-robin,fairbatching:pab:reject"]
    args += ["--cache", str(tmp_path / "cache"), "--workers", "1", "--out", str(tmp_path / "cl")]
    res = CliRunner().invoke(app, [*args, "--gpus", "3"])
    assert isinstance(res.exception, FairBatchingError) and "one engine per node" in str(res.exception)  # exit 2
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "cl" / "cluster.json").read_text())["rows"]
    assert [r["stack"] for r in rows] == ["vllm+round-robin", "fairbatching+pab+reject"]
    assert all(0 <= r["sim_slo_attainment"] <= 1 for r in rows)


def test_compare_with_prefix_caching_on_the_gpu_backend(tmp_path):
    """The engines hash each prompt's token ids and cache its blocks: measured and simulated hit rates agree on
    a trace whose prompts share their first block (every prompt but the first finds it)."""
    from typer.testing import CliRunner

    from fairbatching.cli import app

    trace = shared_prefix_trace(tmp_path / "t.jsonl")
    args = ["compare", "--backend", "gpu", *CPU_ENGINE_ARGS, "--trace", trace, "--prefix-caching"]
    res = CliRunner().invoke(app, [*args, "--policies", "fairbatching", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "cmp" / "summary.json").read_text())["results"]
    assert row["finished"] == 6
    assert (
        row["prefix_hit_rate"]
        == pytest.approx(row["sim"]["prefix_hit_rate"])
        == 5 * 512 / sum(560 + 8 * i for i in range(6))
    )
