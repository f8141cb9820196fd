"""The mypyc build (what ``pip install .`` installs) computes exactly what the pure-Python source does.

The module fixture compiles the hot-path modules listed in pyproject.toml into a copy of src/ (about
20-40 s), the way a wheel build does; the tests then run simulations and a set of this suite's own test
files against that copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("mypyc", reason="mypyc (the dev extra's mypy) compiles the hot path")

ROOT = Path(__file__).resolve().parents[1]
COMPILED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["fairbatching"]["compiled"]
# Test files whose code paths are the compiled modules': policies, the step loop, the cluster, the engine
# and Ray-free integrations. (Tests that patch methods of compiled classes stay pure-only.)
SUITE = [
    "tests/test_policies.py",
    "tests/test_envelope.py",
    "tests/test_costmodel.py",
    "tests/test_simulator.py",
    "tests/test_model_error.py",
    "tests/test_cluster.py",
    "tests/test_engine_cluster.py",
    "tests/test_vllm_settings.py",
]


@pytest.fixture(scope="module")
def compiled_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("compiled")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "_build" / "inplace.py"), str(dest)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip())


def run_with(src: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_every_listed_module_is_imported_compiled(compiled_src: Path):
    code = "import importlib, sys; print(*(importlib.import_module(m).__file__ for m in sys.argv[1:]), sep='\\n')"
    proc = run_with(compiled_src, "-c", code, *COMPILED)
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    assert len(files) == len(COMPILED)
    assert all(f.startswith(str(compiled_src)) and f.endswith(".so") for f in files), files


def test_version_says_the_compiled_build_is_loaded(compiled_src: Path):
    from fairbatching.cli import HOT_PATH

    assert set(HOT_PATH) <= set(COMPILED)  # what --version looks at is what the build compiles
    proc = run_with(compiled_src, "-m", "fairbatching", "--version")
    assert proc.returncode == 0, proc.stderr
    assert "build: compiled (mypyc)" in proc.stdout


def test_simulations_are_bit_identical_to_pure_python(compiled_src: Path):
    pure = run_with(ROOT / "src", "tests/compiled_digest.py", "600")
    compiled = run_with(compiled_src, "tests/compiled_digest.py", "600")
    assert pure.returncode == 0 and compiled.returncode == 0, pure.stderr[-2000:] + compiled.stderr[-2000:]
    assert len(pure.stdout.splitlines()) == 12
    assert compiled.stdout == pure.stdout


def test_suite_passes_on_the_compiled_build(compiled_src: Path):
    proc = run_with(compiled_src, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE)
    assert proc.returncode == 0, proc.stdout[-6000:]
    # The run imported the compiled modules, not the source.
    probe = run_with(compiled_src, "-c", "import fairbatching.policies.base as b; print(b.__file__)")
    assert probe.stdout.strip().endswith(".so")
