"""Compile the hot path into a copy of the source tree: ``python _build/inplace.py DEST``.

Copies src/ with setup.py and pyproject.toml to DEST and builds the mypyc extensions next to their
modules there, as a wheel build would; ``PYTHONPATH=DEST/src`` then imports the compiled build.
tests/test_compiled.py and benchmarks/bench_simulator.py (``--builds``) compare it with the source.
Exits non-zero naming the first missing extension if any listed module did not compile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_copy(dest: Path) -> Path:
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest)
    env = {**os.environ, "FAIRBATCHING_MYPYC": "1"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, text=True, capture_output=True
    )
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["fairbatching"]["compiled"]
    for module in modules:
        stem = dest / "src" / module.replace(".", "/")
        if not list(stem.parent.glob(f"{stem.name}.*.so")):
            sys.exit(f"{module} did not compile:\n{proc.stderr[-4000:]}")
    return dest / "src"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python _build/inplace.py DEST")
    print(compile_copy(Path(sys.argv[1])))
