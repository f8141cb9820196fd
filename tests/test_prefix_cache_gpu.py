"""benchmarks/prefix_cache_gpu.py: one line and exit 2 without a GPU, and (with torch) the whole grid on a tiny
CPU engine: every replay's JSON and summary.csv, and a second call that runs only what is missing."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "prefix_cache_gpu.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(cuda(), reason="this machine has a GPU: the benchmark would run")
def test_without_a_gpu_it_refuses_in_one_line_and_writes_nothing(tmp_path):
    res = bench("--out", str(tmp_path / "out"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the engine needs the [gpu] extra (torch)")
def test_the_grid_on_a_tiny_cpu_engine_writes_each_replay_and_resumes(tmp_path):
    res = bench("--out", str(tmp_path), "--tiny")
    assert res.returncode == 0, res.stderr + res.stdout
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["run"] for r in rows] == [
        f"{sc}-{p}{c}"
        for sc in ("multi-turn", "mooncake-conv")
        for p in ("fairbatching", "vllm")
        for c in ("", "-cache")
    ]
    for r in rows:
        assert r["requests"] == "6" and 0 <= float(r["slo_attainment"]) <= 1 and float(r["ttft_p99"]) > 0
        assert (r["prefix_hit_rate"] == "") == (r["prefix_caching"] == "False")
    (tmp_path / "runs" / "mooncake-conv-vllm.json").unlink()
    res = bench("--out", str(tmp_path), "--tiny")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "1 of 8 replays to run" in res.stdout and "8 of 8 replays" in res.stdout
