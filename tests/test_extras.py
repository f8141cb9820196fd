"""Each install the README offers works alone, as a fresh venv resolves it today: the base package runs a
simulation without Ray or torch, and the ``serve`` extra answers a real completion through ``fairbatching
serve`` and stops cleanly on SIGTERM.

The rest of the suite runs in the ``dev`` venv, where vLLM's constraints pick other versions (fastapi
0.136 instead of the 0.165 that ``serve`` alone resolves): a break that only a user of one extra would meet
shows up here. Editable installs (``-e``) skip the mypyc build; pip's cache keeps repeat runs short.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_venv(where: Path, spec: str) -> Path:
    """A new venv under ``where`` with ``spec`` installed from this checkout; returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    bin_dir = where / "bin"
    res = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "-e", spec],
        capture_output=True,
        text=True,
        timeout=1200,
        env=clean_env(),
    )
    assert res.returncode == 0, f"installing {spec} (pip, editable) failed:\n{res.stderr[-3000:]}"
    return bin_dir


def clean_env() -> dict[str, str]:
    """This process's environment without what points Python at the test venv or the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_base_package_alone_simulates_without_ray_or_torch(tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", str(REPO))
    env = clean_env()
    missing = "import importlib.util as u; print([m for m in ('ray', 'torch', 'vllm') if u.find_spec(m)])"
    res = subprocess.run([str(bin_dir / "python"), "-c", missing], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    args = [str(bin_dir / "fairbatching"), "simulate", "-n", "60", "--json"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "slo_attainment" in res.stdout


def test_the_serve_extra_alone_answers_a_completion_and_stops_on_sigterm(tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", f"{REPO}[serve]")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    args = [str(bin_dir / "fairbatching"), "serve", "--replicas", "1", "--port", str(port), "--time-scale", "0.5"]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)  # the poll interval while Ray starts, not a timing assumption
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        body = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["text"] == "abc" and reply["usage"]["prompt_tokens"] == 5
        proc.terminate()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output[-3000:]
    assert "drained: 0 of 0" in output
