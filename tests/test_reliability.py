"""Interrupted runs fail loudly and leave nothing half-written; caches cannot go stale; legitimate but unusual
inputs (a byte-order mark, BurstGPT failure rows) give correct results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_as_from_a_terminal

from fairbatching.costmodel import load_profile
from fairbatching.errors import ConfigError
from fairbatching.evaluation import Sweeper
from fairbatching.evaluation.bounds import clairvoyant_capacity, windows_capacity
from fairbatching.runs import RunSpec
from fairbatching.validate import staged_dir
from fairbatching.workloads import load_trace
from fairbatching.workloads.families import family

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def azure_rows(n: int, output: int = 20) -> str:
    return "".join(f"2023-11-16 18:15:{i // 10:02d}.{i % 10}00000,{100 + 7 * i},{output}\n" for i in range(n))


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairbatching", "compare", "-n", "20000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=sigint_as_from_a_terminal,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    deadline = time.monotonic() + 60
    line = ""
    while "requests over" not in line and time.monotonic() < deadline:  # the banner: simulation has started
        line = proc.stderr.readline()
    assert "requests over" in line, "the simulation never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "aborted" in err
    assert list(tmp_path.iterdir()) == []


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text("old\n")
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as tmp:
        (tmp / "summary.json").write_text("new, half")
        raise KeyboardInterrupt
    assert (out / "summary.json").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with staged_dir(out) as tmp:
        (tmp / "summary.json").write_text("new\n")
    assert (out / "summary.json").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_trace_edited_in_place_is_simulated_again(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text(AZURE_HEADER + azure_rows(40, output=20))
    spec = RunSpec("vllm", str(trace), 4.0, num_requests=40)
    cache = tmp_path / "cache"
    first = Sweeper(cache, workers=1).run([spec])[0]
    key = spec.key()
    trace.write_text(AZURE_HEADER + azure_rows(40, output=200))  # same path, ten times the output
    second = Sweeper(cache, workers=1).run([spec])[0]
    assert spec.key() != key
    assert second.summary.throughput_tok_s > 2 * first.summary.throughput_tok_s


@pytest.mark.parametrize("content", [b"{}", b"\xff\xfe\x00binary", b"[]", b'{"key": "x", "summary": {}}'])
def test_unreadable_cache_entries_are_recomputed(tmp_path, content):
    spec = RunSpec("fairbatching", "default", 10.0, num_requests=40)
    good = Sweeper(tmp_path, workers=1).run([spec])[0]
    entry = tmp_path / f"{spec.key()}.json"
    entry.write_bytes(content)
    again = Sweeper(tmp_path, workers=1).run([spec])[0]
    assert again == good
    assert json.loads(entry.read_text()) == good.to_json()  # and the entry is repaired


def test_csv_with_byte_order_mark_loads(tmp_path):
    trace = tmp_path / "excel.csv"
    trace.write_bytes(b"\xef\xbb\xbf" + (AZURE_HEADER + azure_rows(5)).encode())
    w = load_trace(trace)
    assert len(w) == 5 and w.meta["format"] == "azure"
    assert [r.prompt_len for r in w.requests] == [100, 107, 114, 121, 128]


def test_burstgpt_failure_rows_are_counted_and_reported(tmp_path):
    trace = tmp_path / "burst.csv"
    trace.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "0,ChatGPT,10,5,15,Conversation log\n"
        "1,ChatGPT,10,0,10,Conversation log\n"
        "2,ChatGPT,0,0,0,Conversation log\n"
        "3,ChatGPT,20,8,28,Conversation log\n"
    )
    w = load_trace(trace)
    assert len(w) == 2 and w.meta["skipped_rows"] == 2
    res = subprocess.run(
        [sys.executable, "-m", "fairbatching", "simulate", "--trace", str(trace)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "skipped 2 trace rows of failed requests" in res.stderr


def test_all_equal_timestamps_cannot_be_rescaled(tmp_path):
    trace = tmp_path / "burst.csv"
    trace.write_text(AZURE_HEADER + "".join("2023-11-16 18:15:00,100,20\n" for _ in range(4)))
    w = load_trace(trace)
    with pytest.raises(ConfigError, match="same time"):
        w.rescaled(5.0)


def test_capacity_bound_uses_the_searched_windows_or_none():
    prof = load_profile()
    fam = family("default")
    short = [fam.build(1.0, s, 200) for s in range(3)]
    assert windows_capacity(short, prof) is None  # one long output's decode chain sets the time, not throughput
    long = [fam.build(1.0, s, 6000) for s in range(2)]
    bound = windows_capacity(long, prof)
    assert bound is not None
    per_window = [clairvoyant_capacity(w, prof) for w in long]
    assert min(per_window) <= bound <= max(per_window)
