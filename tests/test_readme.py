"""Every `fairbatching ...` example in README.md and docs/*.md runs as written, shortened with -n, from an empty
directory.

The commands are read from the pages themselves (their bash blocks), so an example edited there is tested as
edited. They run in a
fresh temporary directory, where no ``../shared`` exists: traces come from the package by name. Searches
also get one seed and a coarse tolerance, so the whole file stays well under two minutes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fairbatching.cli import app
from fairbatching.errors import FairBatchingError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NUM = "60"
SEARCHES = {"capacity", "evaluate"}  # and `cluster --capacity`
# Examples that need what a CPU test cannot have, each with the reason.
NOT_HERE = {
    "cpu": "runs the engine on the CPU (tests/test_engine.py::test_profile_and_replay_commands_on_the_cpu covers it)",
    "--ray": "starts Ray (tests/test_evaluation.py::test_sweep_on_a_local_ray_instance covers it)",
    "serve": "starts a Ray Serve application that runs until stopped (tests/test_ray_serve.py covers it)",
    "bench": "needs a running server at --url (tests/test_ray_serve.py benches a live one)",
}
# Examples that run GPU engines: without a CUDA GPU they must be refused by the device check, which comes after
# the command line was parsed, so an option misspelled in one still fails here.
ON_THE_GPU = ("profile", "replay", "--backend")


def page_commands(page: Path) -> list[str]:
    """``fairbatching`` lines of a page's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("fairbatching "):
                commands.append(" ".join(shlex.split(line, comments=True)))
    return commands


def readme_commands() -> list[str]:
    """Every page's examples, each once (a command shown on two pages runs once), in page order."""
    return list(dict.fromkeys(c for page in PAGES for c in page_commands(page)))


def shortened(args: list[str]) -> list[str]:
    """The same command with few requests (and, for capacity searches, one seed and a coarse tolerance)."""
    out = list(args)
    if out[0].startswith("-"):  # the top level's own options (--version)
        return out
    if "-n" in out:
        out[out.index("-n") + 1] = NUM
    elif out[0] not in ("traces", "profiles", "options", "fit-profile", "vllm-settings"):
        out += ["-n", NUM]
    if out[0] in SEARCHES or "--capacity" in out:
        out += ["--seeds", "1", "--tolerance", "0.3"]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An empty directory holding only the user's own files the examples name (a trace, profile rows)."""
    from fairbatching.costmodel import load_profile
    from fairbatching.costmodel.model import predict_with

    d = tmp_path_factory.mktemp("fresh")
    rng = np.random.default_rng(0)
    lines = [
        f'{{"timestamp": {t}, "input_length": {p}, "output_length": {o}}}'
        for t, p, o in zip(
            np.cumsum(rng.integers(0, 400, 80)), rng.integers(64, 2048, 80), rng.integers(4, 300, 80), strict=True
        )
    ]
    (d / "my_trace.jsonl").write_text("\n".join(lines) + "\n")
    x = np.column_stack(
        [rng.integers(1, 4096, 60), rng.integers(1, 200_000, 60), rng.integers(1, 64, 60), rng.random(60) * 1e6]
    ).astype(float)
    y = predict_with(load_profile(None).params.as_array(), x)
    header = "new_tokens,context_tokens,num_seqs,attn_work,latency_s"
    np.savetxt(d / "rows.csv", np.column_stack([x, y]), delimiter=",", comments="", header=header)
    # `simulate --profile my-gpu.json` follows the fit-profile example; each example must also run alone.
    assert CliRunner().invoke(app, ["fit-profile", str(d / "rows.csv"), "--out", str(d / "my-gpu.json")]).exit_code == 0
    return d


def test_the_pages_have_the_examples_this_file_runs():
    commands = readme_commands()
    assert len(commands) >= 15
    assert {p.name for p in PAGES} >= {"README.md", "cli.md", "gpu.md", "ray-serve.md"}
    assert all(c in commands for c in page_commands(ROOT / "docs" / "cli.md"))  # the docs' examples are read
    assert not [c for c in commands if "shared/traces" in c]
    package = README.parent / "src" / "fairbatching"
    assert not [
        p for p in package.rglob("*.py") if "shared" + "/traces" in p.read_text() or '"shared"' in p.read_text()
    ]
    assert {c.split()[1] for c in commands} >= {
        *("traces", "compare", "capacity", "sweep", "evaluate", "cluster", "options", "profile", "replay")
    }


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: c.removeprefix("fairbatching ")[:60])
def test_readme_example_runs_in_a_fresh_directory(command, workdir, monkeypatch):
    args = shlex.split(command)[1:]
    reason = next((why for key, why in NOT_HERE.items() if key in args), None)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(workdir)
    if any(key in args for key in ON_THE_GPU):
        if _cuda():
            pytest.skip("runs GPU engines for minutes (tests/test_engine.py covers the engine)")
        res = CliRunner().invoke(app, args)
        refused = isinstance(res.exception, FairBatchingError) and "needs a CUDA GPU" in str(res.exception)
        assert refused or "needs the [gpu] extra" in str(res.exception), f"{command}\n{res.output}\n{res.exception!r}"
        if "--out" in args:
            assert not (workdir / args[args.index("--out") + 1]).exists(), "a refused GPU command wrote output"
        return
    res = CliRunner().invoke(app, shortened(args))
    assert res.exit_code == 0, f"{command}\n{res.output}\n{res.exception!r}"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]


def unusable_install_targets(text: str) -> list[str]:
    """What the ``pip install`` commands in ``text`` ask for that pip cannot install from this checkout or from
    PyPI: anything but the checkout itself (``.``, ``-e '.[extra]'`` with a declared extra) or a package this
    project already depends on (those come from PyPI in every install)."""
    import re

    project = _pyproject()
    extras = set(project["optional-dependencies"])
    requirements = [*project["dependencies"], *(r for reqs in project["optional-dependencies"].values() for r in reqs)]
    known = {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower() for r in requirements}
    bad = []
    for args in re.findall(r"pip3? install ([^`\n#)]*?)(?:`|\n|#|\)| in |&&|$)", text):
        try:
            targets = shlex.split(args)
        except ValueError:  # an unclosed quote: the command is cut off inside code, take its words
            targets = args.replace("'", " ").replace('"', " ").split()
        for target in targets:
            if target.startswith("-"):
                continue
            checkout = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
            if checkout:
                ok = not checkout[1] or set(checkout[1].split(",")) <= extras
            else:
                name = re.match(r"[A-Za-z0-9_.-]+", target)
                ok = name is not None and name[0].lower() in known
            if not ok:
                bad.append(target)
    return bad


def test_install_hints_name_only_this_checkout_or_registered_packages():
    from fairbatching.errors import install_hint

    root = README.parent
    assert unusable_install_targets("pip install 'fairbatching[gpu]'") == ["fairbatching[gpu]"]  # the check bites
    assert unusable_install_targets("pip install -e '.[cuda]'") == [".[cuda]"]
    for extra in _pyproject()["optional-dependencies"]:
        assert not unusable_install_targets(install_hint(extra)), extra
    docs = [root / "README.md", root / ".ci" / "run", *(root / "docs").rglob("*.md"), *(root / "results").rglob("*.md")]
    code = [*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py"), *(root / "tests").glob("*.py")]
    code = [p for p in code if p.name != "errors.py" and p != Path(__file__)]  # the hint itself; this file's cases
    bad = {str(p.relative_to(root)): unusable_install_targets(p.read_text()) for p in docs + code}
    assert not {p: b for p, b in bad.items() if b}
    # Messages build an extra's hint with install_hint, so there is one wording to keep right.
    messages = [p for p in (root / "src").rglob("*.py") if re.search(r"pip install[^\n]*\[", p.read_text())]
    assert [p.name for p in messages] == ["errors.py"]


def test_tests_read_no_data_outside_the_repository():
    outside = ("../" + "shared", "parents[1]" + ".parent")
    tests = Path(__file__).parent
    assert not [p.name for p in tests.glob("*.py") if p != Path(__file__) and any(o in p.read_text() for o in outside)]
