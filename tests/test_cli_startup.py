"""The command line answers --help without loading the library: what a fresh interpreter imported, not a timing."""

import json
import subprocess
import sys

import pytest

# Each of these costs start-up time that --help does not need (numpy and the simulator ~0.15 s, pydantic ~0.1 s).
HEAVY = ("numpy", "scipy", "matplotlib", "pydantic", "rich.progress", "fairbatching.core", "fairbatching.serving")

PROBE = """
import json, sys
from fairbatching.cli import main
sys.argv = ["fairbatching", *sys.argv[1:]]
try:
    main()
finally:
    print("\\nMODULES " + json.dumps(sorted(sys.modules)))
"""


def modules_after(*args: str) -> set[str]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    return set(json.loads(res.stdout.rsplit("MODULES ", 1)[1]))


@pytest.mark.parametrize("args", [["simulate", "--help"], ["compare", "--help"], ["--help"]])
def test_help_imports_no_numpy_pydantic_or_simulator(args):
    loaded = modules_after(*args)
    assert "typer" in loaded  # the probe ran the CLI
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
