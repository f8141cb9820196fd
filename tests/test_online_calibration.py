"""Online calibration and the vLLM integration's settings: pure logic, no vLLM needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fairbatching.core.request import SLO
from fairbatching.costmodel.model import CostModel, CostParams, attn_work
from fairbatching.costmodel.online import OnlineCalibrator
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.vllm.settings import SchedulerSettings, request_slo

TRUTH = CostParams(t_fixed=0.0, c_seq=2e-5, t_weights=0.009, c_kv=5e-8, c_tok=2.5e-5, c_attn=1.8e-9, t_mixed=0.003)


def _serving_steps(n, seed=0):
    """Steps as a server runs them: decode-only batches and mixed ones with a prefill chunk."""
    rng = np.random.default_rng(seed)
    truth = CostModel(TRUTH)
    for _ in range(n):
        seqs = int(rng.integers(1, 200))
        ctx = int(seqs * rng.integers(100, 3000))
        chunk = int(rng.choice([0, 0, 64, 512, 2048]))
        new, attn = seqs + chunk, float(ctx + attn_work(chunk, 0))
        t = truth.predict(new, ctx + chunk, seqs + (chunk > 0), attn) * (1 + 0.02 * rng.standard_normal())
        yield new, ctx + chunk, seqs + (chunk > 0), attn, t


def test_online_calibration_converges_from_a_wrong_prior():
    prior = load_profile("llama-3-8b-h100-analytic").cost_model()  # a roofline guess, far from TRUTH
    steps = list(_serving_steps(1000))
    prior_error = np.mean([abs(prior.predict(*r[:4]) / r[4] - 1) for r in steps])
    cal = OnlineCalibrator(prior, min_steps=64, refit_every=32)
    converged_at = None
    for i, row in enumerate(steps):
        cal.observe(*row)
        if converged_at is None and cal.fits and cal.mape() < 0.05:
            converged_at = i + 1
    assert prior_error > 0.2
    assert converged_at is not None and converged_at <= 128
    assert cal.mape() < 0.03
    assert abs(cal.model.params.t_mixed - TRUTH.t_mixed) < 1e-3


def test_calibration_waits_for_varied_steps():
    cal = OnlineCalibrator(load_profile().cost_model(), min_steps=8, refit_every=8)
    for _ in range(40):  # one batch shape only: nothing to separate the terms
        cal.observe(32, 32 * 1000, 32, 32 * 1000.0, 0.012)
    assert cal.fits == 0
    assert cal.model is not None
    assert not cal.observe(0, 0, 0, 0.0, 0.01)  # empty steps are ignored


def test_settings_from_file_and_environment(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"policy": "sarathi", "ttft_slo": 1.0, "policy_options": {"token_budget": 512}}))
    s = SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg), "FAIRBATCHING_TPOT_SLO": "0.05"})
    assert (s.policy, s.ttft_slo, s.tpot_slo, s.policy_options) == ("sarathi", 1.0, 0.05, {"token_budget": 512})
    yaml_cfg = tmp_path / "fb.yaml"
    yaml_cfg.write_text("policy: fairbatching\nmetrics_port: 9400\n")
    pytest.importorskip("yaml")
    assert SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(yaml_cfg)}).metrics_port == 9400


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FAIRBATCHING_TTFT_SLO": "soon"}, "not a number of seconds"),
        ({"FAIRBATCHING_TPOT_SLO": "-1"}, "SLO tpot must be a positive"),
        ({"FAIRBATCHING_CALIBRATION": "sometimes"}, "calibration must be"),
        ({"FAIRBATCHING_METRICS_PORT": "http"}, "not a port number"),
        ({"FAIRBATCHING_CONFIG": "/nonexistent/fb.json"}, "cannot read"),
    ],
)
def test_bad_settings_are_named(env, message):
    with pytest.raises(ConfigError, match=message):
        SchedulerSettings.load(env)


def test_unknown_config_keys_and_bad_json(tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"polcy": "sarathi"}))
    with pytest.raises(ConfigError, match="unknown key"):
        SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg)})
    cfg.write_text("{")
    with pytest.raises(ConfigError, match="line 1: invalid JSON"):
        SchedulerSettings.load({"FAIRBATCHING_CONFIG": str(cfg)})


def test_request_slo_override():
    default = SLO(2.0, 0.1)
    assert request_slo(None, default) == (default, None)
    assert request_slo({"other": 1}, default) == (default, None)
    assert request_slo({"ttft_slo": 0.5}, default) == (SLO(0.5, 0.1), None)
    slo, problem = request_slo({"tpot_slo": "nan"}, default)
    assert slo == default and "invalid per-request SLO" in problem
