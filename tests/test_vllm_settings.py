"""The vLLM integration's settings: every bad value stops the engine with one line naming the setting and
where it came from (environment variable, config file key or --additional-config key). No vLLM needed."""

from __future__ import annotations

import json

import pytest

from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.vllm.settings import SchedulerSettings, request_slo

FB = "fairbatching"


def test_settings_from_file_and_environment(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"policy": "sarathi", "ttft_slo": 1.0, "policy_options": {"token_budget": 512}}))
    s = SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg), "FAIRBATCHING_TPOT_SLO": "0.05"})
    assert (s.policy, s.ttft_slo, s.tpot_slo, s.policy_options) == ("sarathi", 1.0, 0.05, {"token_budget": 512})
    assert s.metrics_host == "127.0.0.1" and s.metrics_port is None
    yaml_cfg = tmp_path / "fb.yaml"
    yaml_cfg.write_text("policy: fairbatching\nmetrics_port: 9400\n")
    pytest.importorskip("yaml")
    assert SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(yaml_cfg)}).metrics_port == 9400


def test_precedence_file_then_additional_config_then_environment(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"ttft_slo": 1.0, "tpot_slo": 0.2, "metrics_port": 9400}))
    s = SchedulerSettings.load(
        {"FAIRBATCHING_CONFIG": str(cfg), "FAIRBATCHING_TPOT_SLO": "0.05"},
        {FB: {"ttft_slo": 3.0, "tpot_slo": 0.3, "metrics_host": "0.0.0.0"}},
    )
    assert (s.ttft_slo, s.tpot_slo, s.metrics_port, s.metrics_host) == (3.0, 0.05, 9400, "0.0.0.0")
    line = s.describe()
    assert "ttft_slo=3s" in line and "tpot_slo=0.05s" in line and "pab_metrics=http://0.0.0.0:9400/metrics" in line
    assert "tpot_slo from FAIRBATCHING_TPOT_SLO" in line and "ttft_slo from --additional-config fairbatching." in line
    assert "metrics_port from " + str(cfg) in line


def test_other_additional_config_keys_are_left_alone():
    assert SchedulerSettings.load({}, {"gdn_prefill_backend": "x"}) == SchedulerSettings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FAIRBATCHING_TTFT_SLO": "soon"}, "FAIRBATCHING_TTFT_SLO='soon': not a number of seconds"),
        ({"FAIRBATCHING_TPOT_SLO": "-1"}, "FAIRBATCHING_TPOT_SLO=-1.0: must be a positive finite"),
        ({"FAIRBATCHING_TPOT_SLO": "1e-9"}, "FAIRBATCHING_TPOT_SLO=1e-09: .* below the fastest possible decode step"),
        ({"FAIRBATCHING_TTFT_SLO": "inf"}, "FAIRBATCHING_TTFT_SLO=inf: must be a positive finite"),
        ({"FAIRBATCHING_CALIBRATION": "sometimes"}, "FAIRBATCHING_CALIBRATION='sometimes': must be 'online' or"),
        ({"FAIRBATCHING_METRICS_PORT": "http"}, "FAIRBATCHING_METRICS_PORT='http': not a port number"),
        ({"FAIRBATCHING_METRICS_PORT": "9400.5"}, "FAIRBATCHING_METRICS_PORT='9400.5': not a port number"),
        ({"FAIRBATCHING_METRICS_PORT": "0"}, "FAIRBATCHING_METRICS_PORT=0: must be a TCP port"),
        ({"FAIRBATCHING_METRICS_PORT": "70000"}, "FAIRBATCHING_METRICS_PORT=70000: must be a TCP port"),
        ({"FAIRBATCHING_METRICS_HOST": ""}, "FAIRBATCHING_METRICS_HOST='': must be an address"),
        ({"FAIRBATCHING_POLICY": "fifo"}, "FAIRBATCHING_POLICY='fifo': unknown policy"),
        ({"FAIRBATCHING_PROFILE": "h200"}, "FAIRBATCHING_PROFILE='h200': unknown profile"),
        (
            {"FAIRBATCHING_TTFT": "1"},
            "FAIRBATCHING_TTFT: unknown environment variable; did you mean FAIRBATCHING_TTFT_SLO",
        ),
        ({"FAIRBATCHING_POLICY_OPTIONS": "{}"}, "FAIRBATCHING_POLICY_OPTIONS: unknown environment variable"),
        ({"FAIRBATCHING_CONFIG": "/nonexistent/fb.json"}, "FAIRBATCHING_CONFIG='/nonexistent/fb.json': cannot read"),
    ],
)
def test_bad_environment_is_named(env, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerSettings.load(env)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"ttft_slo": True}, "ttft_slo=True: must be a positive finite number"),
        ({"ttft_slo": "2"}, "ttft_slo='2': must be a positive finite number"),
        ({"metrics_port": True}, "metrics_port=True: must be a TCP port"),
        ({"metrics_port": 0}, "metrics_port=0: must be a TCP port"),
        ({"metrics_port": 9400.5}, "metrics_port=9400.5: must be a TCP port"),
        ({"metrics_host": 1}, "metrics_host=1: must be an address"),
        ({"ttft": 1}, "ttft: unknown setting; did you mean 'ttft_slo'"),
        ({"policy_options": [1]}, "policy_options=\\[1\\]: must be a mapping"),
        (
            {"policy": "sarathi", "policy_options": {"token_budget": "big"}},
            "policy_options=.*token_budget='big': must be an integer",
        ),
        ({"policy": "sarathi", "policy_options": {"token_budget": 2.5}}, "token_budget=2.5: must be an integer"),
        ({"policy_options": {"kv_high_watermark": float("nan")}}, "kv_high_watermark=nan: must be a finite number"),
        ({"policy_options": {"min_chunk": True}}, "min_chunk=True: must be an integer"),
        ({"policy_options": {"bogus": 1}}, "fairbatching.bogus: unknown option; fairbatching takes"),
        ({"policy": ["sarathi"]}, "policy=\\['sarathi'\\]: unknown policy"),
    ],
)
def test_bad_additional_config_is_named(section, message):
    with pytest.raises(ConfigError, match="^fairbatching scheduler: --additional-config fairbatching.*" + message):
        SchedulerSettings.load({}, {FB: section})


def test_bad_file_keys_and_json_are_named(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"polcy": "sarathi"}))
    with pytest.raises(ConfigError, match=f"{cfg}: key polcy: unknown setting; did you mean 'policy'"):
        SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg)})
    cfg.write_text(json.dumps({"ttft_slo": True}))
    with pytest.raises(ConfigError, match=f"{cfg}: key ttft_slo=True: must be a positive"):
        SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg)})
    cfg.write_text("{")
    with pytest.raises(ConfigError, match="line 1: invalid JSON"):
        SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg)})
    with pytest.raises(ConfigError, match="--additional-config fairbatching=3: must be a mapping"):
        SchedulerSettings.load({}, {FB: 3})


@pytest.mark.parametrize("budget", [-5, 0])
def test_policy_option_out_of_range_names_the_setting_at_load(budget):
    message = f"--additional-config fairbatching.policy_options=.*token_budget={budget}: must be an integer >= 1"
    with pytest.raises(ConfigError, match=message):
        SchedulerSettings.load({}, {FB: {"policy": "sarathi", "policy_options": {"token_budget": budget}}})


def test_policy_is_sized_by_vllm_unless_options_say_otherwise():
    cost = load_profile().cost_model()
    assert SchedulerSettings().make_policy(cost, 16, 256).max_num_batched_tokens == 256
    s = SchedulerSettings(policy_options={"max_num_batched_tokens": 128})
    assert s.make_policy(cost, 16, 256).max_num_batched_tokens == 128


def test_request_slo_override():
    default = SLO(2.0, 0.1)
    assert request_slo(None, default) == (default, None)
    assert request_slo({"other": 1}, default) == (default, None)
    assert request_slo({"ttft_slo": 0.5}, default) == (SLO(0.5, 0.1), None)
    slo, problem = request_slo({"tpot_slo": 1e-9}, default, floor=0.005)
    assert slo == default and "below the fastest possible decode step (5 ms)" in problem
    assert request_slo({"tpot_slo": 0.006}, default, floor=0.005) == (SLO(2.0, 0.006), None)
    for bad in ({"tpot_slo": "nan"}, {"ttft_slo": -1}, {"ttft_slo": True}, {"tpot_slo": "0.05"}):
        slo, problem = request_slo(bad, default)
        assert slo == default and "invalid per-request SLO" in problem and "vllm_xargs" in problem


def test_vllm_settings_checks_what_vllm_would_read_before_a_model_loads():
    import os
    import subprocess
    import sys

    def run(*args, **env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("FAIRBATCHING_")} | env
        cmd = [sys.executable, "-m", "fairbatching", "vllm-settings", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full)

    ok = run("--additional-config", '{"fairbatching": {"policy": "sarathi"}}', FAIRBATCHING_TTFT_SLO="1.5")
    assert ok.returncode == 0 and "policy=sarathi ttft_slo=1.5s" in ok.stdout, ok.stderr
    bad = run(FAIRBATCHING_TPOT_SLO="1e-9")
    assert bad.returncode == 2 and "FAIRBATCHING_TPOT_SLO=1e-09" in bad.stderr and "Traceback" not in bad.stderr
    assert run("--additional-config", "[1]").returncode == 2
