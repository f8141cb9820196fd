import json
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fairbatching", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_compare_writes_tables_json_csv_plot_and_report(tmp_path):
    out = tmp_path / "cmp"
    res = cli("compare", "-n", "150", "--policies", "fairbatching,sarathi", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "fairbatching" in res.stdout and "sarathi" in res.stdout and "TTFT p99" in res.stdout
    for name in ("summary.json", "summary.csv", "summary.md", "compare.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in data["results"]] == ["fairbatching", "sarathi"]
    assert all(r["requests"] == 150 for r in data["results"])
    assert data["profile"]["source"] == "measured"
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_simulate_json(tmp_path):
    res = cli("simulate", "-p", "vllm", "-n", "100", "--json", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["summary"]["policy"] == "vllm" and data["summary"]["requests"] == 100
    assert (tmp_path / "requests.csv").read_text().count("\n") == 101


@pytest.mark.parametrize(
    "args,message",
    [
        (["simulate", "-p", "edf"], "unknown policy 'edf'"),
        (["compare", "--policies", "vllm,nope"], "unknown policy 'nope'"),
        (["simulate", "--tpot-slo", "0.0001"], "below the fastest possible decode step"),
        (["simulate", "--ttft-slo", "-1"], "SLO ttft must be a positive"),
        (["simulate", "--profile", "gpt-17-tpu"], "unknown profile 'gpt-17-tpu'"),
        (["simulate", "--trace", "missing.csv"], "no such trace file"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(args, message, tmp_path):
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_malformed_trace_names_file_and_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n2023-11-16 18:17:04,-3,1\n")
    res = cli("simulate", "--trace", str(trace))
    assert res.returncode == 2 and "t.csv: line 3: ContextTokens must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_fit_profile_roundtrip(tmp_path):
    import numpy as np

    from fairbatching.costmodel import analytic_profile
    from fairbatching.costmodel.model import predict_with

    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.integers(1, 4096, 60), rng.integers(1, 200_000, 60), rng.integers(1, 64, 60)])
    attn = rows[:, 0] * 100.0
    x = np.column_stack([rows, attn]).astype(float)
    y = predict_with(analytic_profile().params.as_array(), x)
    path = tmp_path / "rows.csv"
    np.savetxt(
        path,
        np.column_stack([x, y]),
        delimiter=",",
        comments="",
        header="new_tokens,context_tokens,num_seqs,attn_work,latency_s",
    )
    res = cli("fit-profile", str(path), "--out", str(tmp_path / "p.json"), "--name", "mine")
    assert res.returncode == 0, res.stderr
    assert "held-out MAPE" in res.stdout
    res = cli("simulate", "-n", "50", "--profile", str(tmp_path / "p.json"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["profile"]["name"] == "mine"


def test_policy_options_reach_the_policy_and_bad_ones_fail_early():
    default = json.loads(cli("simulate", "-p", "sarathi", "-n", "200", "--json").stdout)
    small = json.loads(cli("simulate", "-p", "sarathi", "-n", "200", "--json", "-o", "sarathi.token_budget=256").stdout)
    assert small["summary"]["ttft"]["p99"] > default["summary"]["ttft"]["p99"]
    bad = cli("simulate", "-n", "10", "-o", "sarathi.chunk=3")
    assert bad.returncode == 2 and "sarathi.chunk: unknown option" in bad.stderr
    malformed = cli("simulate", "-o", "token_budget=3")
    assert malformed.returncode == 2 and "policy.key=value" in malformed.stderr


def test_profiles_lists_sources_and_the_default():
    from typer.testing import CliRunner

    from fairbatching.cli import app

    res = CliRunner().invoke(app, ["profiles"])
    assert res.exit_code == 0
    assert "llama-3-8b-h100-engine (default)  [measured]" in res.output
    assert "llama-3-8b-h100-analytic  [analytic]" in res.output


def test_traces_lists_bundled_traces_within_100_columns():
    from typer.testing import CliRunner

    from fairbatching.cli import app

    res = CliRunner().invoke(app, ["traces"])
    assert res.exit_code == 0
    for name in ("azure-code", "azure-conv", "mooncake-conv", "mooncake-synthetic"):
        assert name in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 100


def test_default_table_fits_100_columns_and_wide_keeps_every_column(tmp_path):
    narrow = cli("compare", "-n", "60", "--policies", "fairbatching,prefill-first", "--out", str(tmp_path / "a"))
    wide = cli("simulate", "-n", "60", "--wide")
    assert narrow.returncode == 0 and wide.returncode == 0, narrow.stderr + wide.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 100
    assert "prefill-first" in narrow.stdout and "…" not in narrow.stdout
    assert "TBT p99" not in narrow.stdout and "TBT p99" in wide.stdout and "rejected + timeout" in wide.stdout
    summary = (tmp_path / "a" / "summary.csv").read_text().splitlines()[0]
    assert "tbt.p99" in summary and "gpu_busy" in summary  # files keep every field


@pytest.mark.parametrize(
    "args,line",
    [
        (["capacity", "--policies", "vllm", "-w", "azure-code"], r"vllm azure-code @ [\d.]+ req/s .* \d+/\d+ "),
        (["cluster", "--capacity", "--pairs", "sarathi:pab", "--qps", "4"], r"sarathi\+pab x4 default @ [\d.]+ req/s"),
        (["sweep", "--qps", "6", "--policies", "vllm"], r"sweep default x 1 SLOs x 1 loads x 1 policies .* 1/1 "),
    ],
)
def test_long_commands_show_what_they_run_on_a_terminal(args, line, tmp_path, monkeypatch):
    """The live line is redrawn ten times a second, so a short run shows at least its last step."""
    import io
    import re

    from rich.console import Console
    from typer.testing import CliRunner

    from fairbatching import cli as cli_mod

    screen = io.StringIO()
    monkeypatch.setattr(cli_mod, "console", Console(file=screen, force_terminal=True, no_color=True, width=120))
    extra = ["-n", "40", "--cache", str(tmp_path), "--workers", "1"]
    extra += ["--out", str(tmp_path / "o")] if args[0] == "sweep" else ["--seeds", "1", "--tolerance", "0.3"]
    res = CliRunner().invoke(cli_mod.app, args + extra)
    assert res.exit_code == 0, res.output
    assert re.search(line, re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.getvalue()))
