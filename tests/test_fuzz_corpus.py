"""Every bad input in tests/fuzz_corpus/manifest.json: exit code 2, one line on stderr naming the problem, no
traceback, and nothing written. Runs ``main()`` in-process (the console script's entry point) for speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fairbatching.cli import main

CORPUS = Path(__file__).parent / "fuzz_corpus"
CASES = json.loads((CORPUS / "manifest.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("not a folder\n")
    argv = [a.replace("{corpus}", str(CORPUS)).replace("{tmp}", str(tmp_path)) for a in case["args"]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fairbatching", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()  # any other exception escaping main() would be a traceback for the user
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert case["expect"] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"], "a refused run left files behind"
