import json
import os
import re
import subprocess
import sys

import pytest


def cli(*args, cwd=None, columns=None):
    """The command in a fresh interpreter; tables fit ``columns``, else run wide as into a file. (The environment
    is passed explicitly: GNU readline, which pytest loads, exports COLUMNS=80 to children behind os.environ.)"""
    env = {**os.environ, **({"COLUMNS": str(columns)} if columns else {})}
    return subprocess.run(
        [sys.executable, "-m", "fairbatching", *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
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


def test_a_workload_of_two_slo_classes_is_reported_class_by_class(tmp_path):
    out = tmp_path / "cmp"
    res = cli(
        "compare", "-w", "mixed-slo", "-n", "120", "--qps", "10", "--policies", "fairbatching,vllm", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    assert "per SLO class" in res.stdout and "0.5 s / 50 ms" in res.stdout and "8 s / 200 ms" in res.stdout
    for r in json.loads((out / "summary.json").read_text())["results"]:
        classes = r["classes"]
        assert [(c["ttft_slo"], c["tpot_slo"]) for c in classes] == [(0.5, 0.05), (8.0, 0.2)]
        assert sum(c["requests"] for c in classes) == r["requests"] == 120
    assert "Per SLO class" in (out / "summary.md").read_text() and "Per SLO class" in (out / "report.html").read_text()


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
        (["simulate", "--ttft-slo", "-1"], "Invalid value for '--ttft-slo': must be a positive finite number"),
        (["simulate", "--profile", "gpt-17-tpu"], "unknown profile 'gpt-17-tpu'"),
        (["simulate", "--trace", "missing.csv"], "no such trace file"),
        (["simulate", "-w", "azure-conv"], "--workload 'azure-conv': not one of mixed-slo, multi-turn"),
        (["compare", "-w", "mixed-slo", "--trace", "azure-conv"], "--trace does not apply"),
        (["evaluate", "--scenarios", ""], "--scenarios: no values given"),
        (["evaluate", "--scenarios", "default:-1:0.1:8"], "--scenarios 'default:-1:0.1:8': TTFT and TPOT must be"),
        (["sweep", "--slos", ""], "--slos: no values given"),
        (["sweep", "--slos", "2:nan"], "--slos '2:nan': TTFT and TPOT must be positive"),
        (["sweep", "--workloads", " , "], "--workloads: no values given"),
        (["cluster", "--pairs", ""], "--pairs: no values given"),
        (["capacity", "--policies", "fairbatching,vllm", "--under-test", "sarathi"], "--under-test 'sarathi' is not"),
        (["cluster", "--pairs", "vllm:pab", "--under-test", "sarathi"], "is not among --pairs (vllm)"),
        (["simulate", "--format", "xml"], "--format xml: reads a --trace file, and none is given"),
        (["simulate", "--start", "5"], "--start 5: skips requests of a --trace, not of the embedded default"),
        (["capacity", "--ray", "nowhere.invalid:1234"], "--ray nowhere.invalid:1234: nothing answers at"),
        (["capacity", "--ray", "justahost"], "--ray 'justahost': give local, auto, HOST:PORT"),
        (["bench", "--url", "http://127.0.0.1:1", "--seed", "-1"], "Invalid value for '--seed'"),
        (["bench", "--url", "http://127.0.0.1:1", "--start", "-1"], "Invalid value for '--start'"),
        (["serve", "--replicas", "0"], "Invalid value for '--replicas'"),
        (["serve", "--report-interval", "0"], "Invalid value for '--report-interval'"),
        (["simulate", "--max-model-len", "1"], "Invalid value for '--max-model-len': must be >= 2"),
        (["cluster", "--gpus", "3", "--nodes", "4"], "--gpus 3: applies only to --backend gpu"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(args, message, tmp_path):
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_malformed_trace_names_file_and_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n2023-11-16 18:17:04,-3,1\n")
    res = cli("simulate", "--trace", str(trace))
    assert res.returncode == 2 and "t.csv: line 3: ContextTokens must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_ray_address_in_ipv6_brackets_is_probed_not_looked_up_as_a_name():
    from fairbatching.errors import ConfigError
    from fairbatching.evaluation.sweep import check_ray_address

    with pytest.raises(ConfigError, match=r"--ray \[::1\]:1: nothing answers at \[::1\]:1") as refused:
        check_ray_address("[::1]:1")
    assert "not known" not in str(refused.value)


def test_a_window_longer_than_its_trace_is_refused_not_cut_short(tmp_path):
    trace = tmp_path / "t.csv"
    rows = "".join(f"2023-11-16 18:17:{s:02d},50,10\n" for s in range(31))
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    for args, message in (
        (["simulate", "--trace", str(trace), "-n", "40"], "has 31 requests: fewer than 40 from request 0"),
        (["simulate", "--trace", str(trace), "-n", "20", "--start", "20"], "fewer than 20 from request 20"),
        (["capacity", "-w", str(trace), "-n", "1000", "--seeds", "1", "--workers", "1"], "only 31 requests"),
    ):
        res = cli(*args, "--policies" if args[0] == "capacity" else "-p", "vllm", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert cli("simulate", "--trace", str(trace), "-n", "31", "-p", "vllm").returncode == 0


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
    # Unnamed, a fitted profile takes its file's name, and a run names it by the path it was given.
    assert cli("fit-profile", str(path), "--out", "out/my-gpu.json", cwd=tmp_path).returncode == 0
    res = cli("simulate", "-n", "50", "--profile", "out/my-gpu.json", cwd=tmp_path, columns=200)
    assert res.returncode == 0, res.stderr
    assert "profile out/my-gpu.json (measured)" in res.stderr
    assert json.loads((tmp_path / "out" / "my-gpu.json").read_text())["name"] == "my-gpu"


def test_policy_options_reach_the_policy_and_bad_ones_fail_early():
    default = json.loads(cli("simulate", "-p", "sarathi", "-n", "200", "--json").stdout)
    small = json.loads(cli("simulate", "-p", "sarathi", "-n", "200", "--json", "-o", "sarathi.token_budget=256").stdout)
    assert small["summary"]["ttft"]["p99"] > default["summary"]["ttft"]["p99"]
    bad = cli("simulate", "-n", "10", "-o", "sarathi.chunk=3")
    assert bad.returncode == 2 and "sarathi.chunk: unknown option" in bad.stderr
    malformed = cli("simulate", "-o", "token_budget=3")
    assert malformed.returncode == 2 and "policy.key=value" in malformed.stderr


def cell(name: str) -> str:
    """A table cell holding exactly ``name``: a name cut or wrapped in a table does not match."""
    return rf"[│┃] {re.escape(name)} +[│┃]"


def test_profiles_lists_sources_and_the_default():
    res = cli("profiles", columns=120)
    assert res.returncode == 0, res.stderr
    assert "default: llama-3-8b-h100-engine" in res.stdout
    assert re.search(cell("llama-3-8b-h100-engine") + r" measured +[│┃]", res.stdout)
    assert re.search(cell("llama-3-8b-h100-analytic") + r" analytic +[│┃]", res.stdout)


TRACES = ("azure-code", "azure-conv", "mooncake-conv", "mooncake-synthetic")
PROFILES = ("llama-3-8b-h100-analytic", "llama-3-8b-h100-engine", "llama-3-8b-h200-engine")
POLICIES = ("fairbatching", "sarathi", "vllm", "prefill-first")
STACKS = ("vllm+round-robin", "sarathi+least-outstanding", "fairbatching+pab", "fairbatching+pab+reject")


@pytest.mark.parametrize(
    "args,names,title",
    [
        (["traces"], TRACES, ""),
        (["profiles"], PROFILES, "cost-model profiles (default: llama-3-8b-h100-engine)"),
        (["simulate", "-n", "60", "--admission", "reject", "--queue-timeout", "0.5"], ("fairbatching",), ""),
        (["compare", "-n", "60", "--out", "o"], POLICIES, "default-conversation-bursty @ 14.80 req/s, SLO 2 s"),
        (["cluster", "-n", "80", "--cache", "c"], STACKS, "4 nodes, default @ 70 req/s, SLO 2 s / 100 ms, 80 requests"),
        (
            ["sweep", "-n", "40", "--qps", "6,12", "--policies", "fairbatching,prefill-first", "--out", "o"],
            ("fairbatching", "prefill-first"),
            "sweep: default, SLO 2 s / 100 ms, 40 requests",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_output_fits_80_columns_with_every_name_whole(args, names, title, tmp_path):
    """At COLUMNS=80 no line of output or progress is longer than 80, and every name a user types back is
    printed whole in its own cell."""
    res = cli(*args, cwd=tmp_path, columns=80)
    assert res.returncode == 0, res.stderr
    long = [line for line in (res.stdout + res.stderr).splitlines() if len(line) > 80]
    assert not long, long
    for name in names:
        assert re.search(cell(name), res.stdout), name
    assert title in " ".join(res.stdout.split())  # the title, however it wrapped
    assert "…" not in res.stdout or args == ["profiles"]  # only descriptions are cut


def test_wide_keeps_every_column_and_files_every_field(tmp_path):
    narrow = cli("compare", "-n", "60", "--policies", "fairbatching,prefill-first", "--out", str(tmp_path / "a"))
    wide = cli("simulate", "-n", "60", "--wide", columns=80)
    assert narrow.returncode == 0 and wide.returncode == 0, narrow.stderr + wide.stderr
    assert "TBT p99" not in narrow.stdout and "refused" not in narrow.stdout  # nothing refused, no admission
    assert "TBT p99" in wide.stdout and "refused" in wide.stdout and "timed out" in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) > 80  # run on past the terminal rather than cut
    summary = (tmp_path / "a" / "summary.csv").read_text().splitlines()[0]
    assert "tbt.p99" in summary and "gpu_busy" in summary  # files keep every field
    traces = cli("traces", "--wide", columns=80)
    assert "license" in traces.stdout and "Mooncake FAST25" in traces.stdout


def test_admission_shows_the_refused_count_by_default():
    args = ["simulate", "-n", "600", "--qps", "30", "--admission", "reject"]
    table, data = cli(*args, columns=80), cli(*args, "--json")
    assert table.returncode == 0 and data.returncode == 0, table.stderr + data.stderr
    refused = json.loads(data.stdout)["summary"]["rejected"]
    assert refused > 0
    header = [line for line in table.stdout.splitlines() if "┃" in line][-1]
    row = next(line for line in table.stdout.splitlines() if "fairbatching" in line)
    assert header.split("┃")[-2].strip() == "refused" and row.split("│")[-2].strip() == str(refused)


def test_version_names_the_build():
    res = cli("--version")
    assert res.returncode == 0, res.stderr
    from fairbatching import __version__

    assert res.stdout.splitlines() == [
        f"fairbatching {__version__}",
        "build: pure Python (`pip install .` in the checkout compiles the hot path)",
    ]


def test_the_cli_runs_on_typer_without_the_help_type_hook():
    """typer before 0.29 has no ``TyperOption.display_type_rich`` (the device machine's 0.27.2 has none): every
    command failed there on import. The help hook is patched only where typer has it."""
    code = (
        "import sys, typer.core as c\n"
        "for k in c.TyperOption.__mro__:\n"
        "    if 'display_type_rich' in vars(k):\n"
        "        delattr(k, 'display_type_rich')\n"
        "from fairbatching.cli import app\n"
        "from typer.testing import CliRunner\n"
        "res = CliRunner().invoke(app, ['traces'])\n"
        "sys.exit(res.exit_code)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr + res.stdout


def test_on_off_flags_show_as_flags_in_help():
    from typer.testing import CliRunner

    from fairbatching.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"simulate", "traces", "cluster", "replay"} <= set(commands)
    for args in [[], *([c] for c in commands)]:
        res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert "--help" in res.output and "<bool>" not in res.output, args
    assert cli("simulate", "--json", "true").returncode == 2  # a flag takes no value


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


def test_progress_bars_show_the_time_remaining_while_a_task_runs():
    import io

    from rich.console import Console

    from fairbatching.progress import progress_bar

    now = [0.0]
    bar = progress_bar(Console(file=io.StringIO(), force_terminal=True, width=120))
    bar.get_time = lambda: now[0]  # what each task's progress samples are stamped with
    task = bar.add_task("replay", total=100)
    eta = bar.columns[-1]
    assert eta.render(bar.tasks[task]).plain == ""  # no rate yet
    for done in (10, 20):
        now[0] += 5.0
        bar.update(task, completed=done)
    assert eta.render(bar.tasks[task]).plain == "ETA 00:40"  # 80 left at 2 per second
    bar.update(task, completed=100)
    assert eta.render(bar.tasks[task]).plain == ""  # done: the elapsed column says how long it took
    unknown = bar.add_task("searching", total=None)
    assert eta.render(bar.tasks[unknown]).plain == ""


def test_a_simulated_capacity_says_how_far_its_profile_was_checked_against_a_gpu():
    """The profile's recorded verdict against the GPU, or that it has none (an analytic profile's estimates)."""
    from fairbatching.cli import _gpu_check
    from fairbatching.costmodel.profile import load_profile

    line = _gpu_check("llama-3-8b-h100-serving", load_profile("llama-3-8b-h100-serving"))
    assert line.startswith("profile llama-3-8b-h100-serving against the GPU, as recorded: FAILED: ") and "91" in line
    analytic = load_profile("llama-3-8b-h100-analytic")
    assert "validation" not in (analytic.fit or {})
    assert _gpu_check("llama-3-8b-h100-analytic", analytic).endswith(
        "records no check against a GPU: its capacities are unvalidated estimates"
    )
