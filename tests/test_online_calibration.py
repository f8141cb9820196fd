"""Online calibration of the cost model from observed step times: pure logic, no vLLM needed."""

from __future__ import annotations

import numpy as np

from fairbatching.costmodel.model import CostModel, CostParams, attn_work
from fairbatching.costmodel.online import OnlineCalibrator
from fairbatching.costmodel.profile import load_profile

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
