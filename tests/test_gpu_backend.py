"""The run layer's GPU backend (``--backend gpu``) end to end on CPU engines (tiny model), and its caching."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import sigint_as_from_a_terminal

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


def shared_prefix_hit_bounds(requests_csv) -> tuple[float, float]:
    """The hit rate a ``shared_prefix_trace`` replay must reach and may reach: a prompt arriving once the first
    one has its first token finds the shared block cached; one arriving while the first is still in prefill (a
    loaded CPU) may not, since a block is cached once computed."""
    with open(requests_csv, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["arrival"]))
    first_done = float(rows[0]["arrival"]) + float(rows[0]["ttft"])
    tokens = sum(int(r["prompt_len"]) for r in rows)
    must = sum(float(r["arrival"]) >= first_done for r in rows[1:])
    return must * 512 / tokens, (len(rows) - 1) * 512 / tokens


class SimulatedEngines:
    """Stands in for ``EngineCluster`` (no torch): replays each job on the simulator, slowed tenfold, so a
    'measured' result differs from its simulated twin."""

    def __init__(self) -> None:
        self.jobs = 0

    def replay_each(self, jobs, progress=None, on_result=None):
        results = []
        for i, job in enumerate(jobs):
            self.jobs += 1
            if progress is not None:  # half the requests ended
                progress(i, len(job.workload) // 2, len(job.workload))
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
    seen = []
    first = Sweeper(tmp_path, workers=1, engines=engines).run(specs, lambda done, total: seen.append((done, total)))
    assert engines.jobs == 3
    assert seen == [(k / 2, 3) for k in range(7)]  # a replay under way counts by the share of its requests that ended
    for r in first:
        assert r.sim is not None and r.summary.requests == r.sim.requests == 30
        assert r.summary.ttft.p50 > r.sim.ttft.p50  # measured (10x slower steps here) vs the simulator's
    again = Sweeper(tmp_path, workers=1).run(specs)  # no engines: everything comes from the cache
    assert [r.summary for r in again] == [r.summary for r in first]
    assert [r.sim for r in again] == [r.sim for r in first]


def test_the_bound_beside_a_gpu_search_is_on_the_windows_it_searches():
    from fairbatching.costmodel.profile import load_profile
    from fairbatching.evaluation.bounds import spec_bound, windows_capacity
    from fairbatching.workloads.families import family

    gpu = RunSpec("vllm", "azure-conv", 1.0, num_requests=2000, backend="gpu", engine=ENGINE)
    fam, prof = family("azure-conv"), load_profile(None)
    on = {first: windows_capacity([fam.build(1.0, s, 2000) for s in (first, first + 1)], prof) for first in (0, 1)}
    assert on[0] is not None and on[1] is not None and on[0] != on[1]
    assert spec_bound(gpu, 2) == on[1] and spec_bound(gpu.simulated(), 2) == on[0]  # seed 0: the calibration window


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


def test_cluster_capacity_on_the_gpu_backend_starts_from_the_simulated_capacity(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    args = ["cluster", "--capacity", "--backend", "gpu", *CPU_ENGINE_ARGS, "--nodes", "2", "-n", "6", "--seeds", "1"]
    args += ["-w", short_trace(tmp_path / "t.csv", 40), "--qps", "4", "--pairs", "vllm:round-robin"]
    args += ["--tolerance", "0.5", "--cache", str(tmp_path / "cache"), "--workers", "1", "--out", str(tmp_path / "cl")]
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "cl" / "cluster.json").read_text())["rows"]
    assert row["stack"] == "vllm+round-robin" and row["sim_capacity_qps"] > 0
    assert row["curve"] and all(p["sim_attainment"] is not None for p in row["curve"])
    assert row["curve"][0]["qps"] <= row["sim_capacity_qps"] <= row["curve"][-1]["qps"]  # the GPU began there
    assert "simulated (req/s)" in res.output and "GPU from there" in res.output
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    on_gpu = [c for c in cached if c["spec"].get("backend") == "gpu"]
    assert on_gpu and all(c["spec"]["cluster"]["nodes"] == 2 and c["spec"]["seed"] >= 1 for c in on_gpu)


def test_evaluate_on_the_gpu_backend_with_cpu_engines(tmp_path):
    from typer.testing import CliRunner

    from fairbatching.cli import app

    trace = short_trace(tmp_path / "t.csv", 40)
    args = ["evaluate", "--backend", "gpu", *CPU_ENGINE_ARGS, "--scenarios", f"{trace}:2:0.1:4", "-n", "6"]
    args += ["--seeds", "1", "--policies", "fairbatching,vllm", "--tolerance", "0.5", "--cache", str(tmp_path / "c")]
    res = CliRunner().invoke(app, [*args, "--workers", "1", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert [r["policy"] for r in rows] == ["fairbatching", "vllm"]
    for r in rows:
        assert r["backend"] == "gpu" and r["sim_capacity_qps"] > 0
        assert r["capacity_curve"] and all(p["sim_attainment"] is not None for p in r["capacity_curve"])
        assert 0 <= r["sim_slo_attainment_at_equal_load"] <= 1 and r["sim_p99_ttft_at_equal_load"] >= 0
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "Real-time replays on GPU engines (tiny on cpu)" in md and f"{rows[0]['sim_capacity_qps']:.2f})" in md
    assert {"report.html", "cdfs_t_2_100ms.png", "slack_t_2_100ms.png"} <= {p.name for p in (tmp_path / "ev").iterdir()}
    cached = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*.json")]
    on_gpu = [c for c in cached if c["spec"].get("backend") == "gpu"]
    assert on_gpu and all("sim" in c and c["spec"]["seed"] >= 1 for c in on_gpu)  # seed 0: the calibration window
    assert "planning with profile" in res.output


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def spawned_children(pid: int) -> list[int]:
    """The processes ``pid`` started with multiprocessing's spawn (the engine replicas), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # not a process, or it ended while being read
            continue
    return found


def blocks_sigint(pid: int) -> bool:
    status = (Path("/proc") / str(pid) / "status").read_text()
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return bool(blocked & (1 << (signal.SIGINT - 1)))


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("when", ["building", "replaying"])
def test_ctrl_c_on_a_gpu_command_stops_its_engines_and_writes_nothing(tmp_path, when):
    """SIGINT to the command's process group, as a Ctrl-C sends it (the replicas get one too, and ignore it):
    exit 130, every replica stopped, no report and no staging folder, whether the engines were still building or
    replaying."""
    trace = short_trace(tmp_path / "t.csv", 40)  # at 0.5 req/s: a replay of over a minute
    out = tmp_path / "cmp"
    args = ["compare", "--backend", "gpu", *CPU_ENGINE_ARGS, "--trace", trace, "--qps", "0.5", "--policies", "vllm"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "fairbatching", *args, "--out", str(out)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if when == "building":
        wait_until(lambda: spawned_children(proc.pid) or proc.poll() is not None, 120, "a replica process")
    else:
        wait_until(lambda: any(" ready in " in x for x in lines) or proc.poll() is not None, 300, "engines ready")
    replicas = spawned_children(proc.pid)
    assert replicas and proc.poll() is None, "".join(lines)
    assert all(blocks_sigint(p) for p in replicas)  # from birth: a Ctrl-C while a replica starts is the parent's
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, "".join(lines)
    reader.join(timeout=10)
    err = "".join(lines)
    assert "aborted" in err and "Traceback" not in err, err
    wait_until(lambda: not any(running(p) for p in replicas), 30, "the replicas to end")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


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
    assert row["sim"]["prefix_hit_rate"] == pytest.approx(5 * 512 / sum(560 + 8 * i for i in range(6)))
    least, most = shared_prefix_hit_bounds(tmp_path / "cmp" / "requests_fairbatching.csv")
    assert most == pytest.approx(row["sim"]["prefix_hit_rate"])
    assert least - 1e-9 <= row["prefix_hit_rate"] <= most + 1e-9
