"""benchmarks/knee_sensitivity.py: the step-price sensitivity that bounds simulator fidelity near the knee."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "knee_sensitivity.py"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT / "src")}, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenarios", "nope"], "--scenarios 'nope': not in"),
        (["--loads", "1,a"], "--loads '1,a': not a comma-separated list of numbers"),
        (["--scales", "0"], "--scales '0': every value must be in (0, 4]"),
        (["--policies", "fifo"], "--policies 'fifo': unknown policy 'fifo'"),
        (["--plan", "missing.json"], "--plan missing.json: no such file"),
    ],
)
def test_a_bad_argument_is_one_line_naming_it_and_exit_2(tmp_path, args, message):
    done = _run("--out", str(tmp_path), *args)
    assert done.returncode == 2 and message in done.stderr and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "sensitivity.json").exists()


def test_dearer_prefill_steps_cost_a_baseline_slos_at_its_capacity(tmp_path):
    """Sarathi at its simulated capacity on the H100's code window, steps carrying prefill 1.5x dearer: fewer
    SLOs met, and the points per 1% say how many."""
    plan = ROOT / "results" / "gpu-tail-h100" / "plan.json"
    done = _run(
        "--out",
        str(tmp_path),
        "--plan",
        str(plan),
        "--scenarios",
        "code-b",
        "--policies",
        "sarathi",
        "--loads",
        "1.0",
        "--scales",
        "1,1.5",
        "--cpus",
        "1",
    )
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "sensitivity.json").read_text())["rows"][0]
    exact, dearer = row["slo"]["1.0"], row["slo"]["1.5"]
    assert exact >= 0.85 and dearer < exact - 0.05
    assert row["points_per_pct"] == [pytest.approx((exact - dearer) * 100 / 50, abs=0.01)]
    assert "| code-b | 14.67 | sarathi |" in done.stdout
