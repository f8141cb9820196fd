import json

import numpy as np
import pytest

from fairbatching.costmodel import (
    BatchFeatures,
    CostModel,
    CostParams,
    Profile,
    analytic_profile,
    available_profiles,
    fit_cost_model,
    load_profile,
    load_profile_rows,
)
from fairbatching.costmodel.fit import ROW_FIELDS
from fairbatching.costmodel.model import attn_work, predict_with
from fairbatching.errors import ConfigError, ProfileError


def synthetic_rows(params: CostParams, n: int = 400, noise: float = 0.01, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        decodes = int(rng.integers(0, 256))
        ctx_each = int(rng.integers(64, 4096))
        chunk = int(rng.choice([0, 0, int(rng.integers(16, 8192))]))
        prior = int(rng.integers(0, 8192))
        chunks = [(1, ctx_each)] * decodes + ([(chunk, prior)] if chunk else [])
        if not chunks:
            chunks = [(1, ctx_each)]
        f = BatchFeatures.of_chunks(chunks)
        rows.append([f.new_tokens, f.context_tokens, f.num_seqs, f.attn_work, 0.0])
    x = np.array(rows, dtype=float)
    x[:, 4] = predict_with(params.as_array(), x[:, :4]) * (1 + noise * rng.standard_normal(len(x)))
    return x


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_fit_recovers_known_coefficients(p):
    true = CostParams(t_fixed=8e-4, c_seq=4e-6, t_weights=6e-3, c_kv=5e-8, c_tok=2.3e-5, c_attn=1.2e-9, p=p)
    report = fit_cost_model(synthetic_rows(true))
    got = report.model.params
    assert got.c_tok == pytest.approx(true.c_tok, rel=0.05)
    assert got.c_kv == pytest.approx(true.c_kv, rel=0.10)
    assert got.c_attn == pytest.approx(true.c_attn, rel=0.10)
    assert got.t_weights + got.t_fixed == pytest.approx(true.t_weights + true.t_fixed, rel=0.10)
    assert report.holdout_mape < 0.02
    assert report.holdout_max_error < 0.06
    assert report.holdout_rows == 80


def test_fit_reports_large_error_when_the_model_does_not_fit():
    rows = synthetic_rows(CostParams(0, 0, 5e-3, 0, 2e-5, 0, 1.0))
    rows[::2, 4] *= 3.0  # half the rows three times slower: no smooth model explains that
    assert fit_cost_model(rows).holdout_mape > 0.2


def test_predict_is_monotone_and_zero_for_empty_batches():
    model = analytic_profile().cost_model()
    assert model.predict(0, 0, 0, 0) == 0.0
    assert model.predict(2048, 2048, 1, attn_work(2048, 0)) > model.predict(1024, 1024, 1, attn_work(1024, 0))
    assert model.predict(64, 64 * 4096, 64, 64 * 4097) > model.predict(64, 64 * 1024, 64, 64 * 1025)


def test_analytic_profile_is_marked_and_physically_plausible():
    prof = load_profile("llama-3-8b-h100-analytic")
    assert prof.source == "analytic" and "ANALYTIC" in prof.note
    m = prof.cost_model()
    decode_step = m.predict(1, 1024, 1, 1025)
    assert 4e-3 < decode_step < 12e-3  # reading 16 GB of weights at ~2.7 TB/s
    prefill_4k = m.predict(4096, 4096, 1, attn_work(4096, 0))
    assert 0.05 < prefill_4k < 0.25  # ~65 TFLOP at a fraction of ~1 PFLOP/s
    assert 200_000 < prof.kv.capacity_tokens < 600_000


def test_profile_json_roundtrip(tmp_path):
    prof = analytic_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    again = load_profile(str(path))
    assert again.params == prof.params and again.kv == prof.kv and again.name == prof.name


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match="unknown profile 'llama-9000'.*llama-3-8b-h100-analytic"):
        load_profile("llama-9000")
    assert "llama-3-8b-h100-analytic" in available_profiles()


def test_malformed_profile_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "source": "measured"}')
    with pytest.raises(ProfileError, match="missing the field 'params'"):
        Profile.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="line 1: not valid JSON"):
        Profile.load(bad)
    neg = json.loads(json.dumps(analytic_profile().to_json()))
    neg["params"]["c_tok"] = -1
    bad.write_text(json.dumps(neg))
    with pytest.raises(ProfileError, match="c_tok"):
        Profile.load(bad)


def write_profile(path, **changes):
    """The analytic profile as a JSON file, with ``changes`` (``params``: merged into its params)."""
    data = json.loads(json.dumps(analytic_profile().to_json()))
    data["params"].update(changes.pop("params", {}))
    path.write_text(json.dumps({**data, **changes}))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"params": {"t_weights": 1e300}}, r"params.t_weights must be finite and at most 3600, got 1e\+300"),
        ({"params": {"c_attn": 3600, "p": 32}}, "the cost model overflows pricing one prompt that fills the"),
        ({"params": {"p": 33}}, "params.p must be finite and at most 32, got 33"),
        ({"fit": "abc"}, "fit must be an object or null, got 'abc'"),
        ({"fit": [1, 2]}, "fit must be an object or null, got \\[1, 2\\]"),
        ({"fit": {"validation": 5}}, "fit.validation must be an object, got 5"),
        ({"fit": {"validation": {"x": 1}}}, "fit.validation.passed must be true or false, got None"),
        ({"fit": {"validation": {"passed": True, "max_gap_pts": "a"}}}, "fit.validation.max_gap_pts .* got 'a'"),
        ({"bogus_key": 1}, "unknown profile field\\(s\\) 'bogus_key'"),
        ({"hardware": [["device", 1]]}, "hardware must be an object"),
        ({"name": None}, "name must be a string, got None"),
    ],
)
def test_bad_profile_fields_are_refused_at_load_naming_file_and_field(tmp_path, changes, message):
    """Each once loaded and then ended a run (or `profiles`) in a traceback, or was silently ignored."""
    bad = write_profile(tmp_path / "bad.json", **changes)
    with pytest.raises(ProfileError, match=f"bad.json: {message}"):
        Profile.load(bad)


def test_every_bundled_profile_and_a_recorded_validation_load(tmp_path):
    for name in available_profiles():
        load_profile(name)
    check = {"passed": False, "max_gap_pts": 4.5, "verdict": "FAILED"}
    assert Profile.load(write_profile(tmp_path / "ok.json", fit={"validation": check})).fit == {"validation": check}


def test_profile_rows_errors_name_file_line_field_and_value(tmp_path):
    header = ",".join(ROW_FIELDS) + "\n"
    good = [f"{n},{n + 100},1,{n * (n + 1) / 2},0.0{n}\n" for n in range(1, 12)]
    rows = tmp_path / "rows.csv"
    rows.write_text(header + "10,10,1,55,0.01\n\n\n10,10,0,55,0.01\n")  # blank lines count
    with pytest.raises(ProfileError, match=r"rows.csv: line 5: num_seqs must be a finite number >= 1, got '0'"):
        load_profile_rows(rows)
    rows.write_text(header + "10,10,1,nan,0.01\n")
    with pytest.raises(ProfileError, match=r"rows.csv: line 2: attn_work must be a finite number >= 0, got 'nan'"):
        load_profile_rows(rows)
    rows.write_text(header + "".join(good[:2]))
    with pytest.raises(ProfileError, match=r"rows.csv: 2 profile rows; need at least 10"):
        load_profile_rows(rows)
    rows.write_text(header + "".join(good))
    assert len(load_profile_rows(rows)) == 11
    jsonl = tmp_path / "rows.jsonl"
    record = json.dumps(dict(zip(ROW_FIELDS, (10, 10, 1, 55, 0.01), strict=True)))
    jsonl.write_text(f"{record}\n" * 5 + "{bad\n")
    with pytest.raises(ProfileError, match=r"rows.jsonl: line 6: not valid JSON"):
        load_profile_rows(jsonl)


def test_profile_rows_errors_name_file_and_line(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("new_tokens,context_tokens,num_seqs,attn_work,latency_s\n10,10,1,55,0.01\n10,x,1,55,0.01\n")
    with pytest.raises(ProfileError, match=r"rows.csv: line 3"):
        load_profile_rows(rows)
    rows.write_text("new_tokens,num_seqs\n1,1\n")
    with pytest.raises(ProfileError, match="missing column"):
        load_profile_rows(rows)


def test_cost_model_params_must_be_non_negative():
    with pytest.raises(ProfileError):
        CostModel(CostParams(0, 0, -1, 0, 0, 0, 1))


def test_a_gpu_plans_with_the_profile_measured_on_its_model_else_says_why_not():
    from fairbatching.costmodel.profile import DEFAULT_PROFILE, profile_for_device

    assert profile_for_device("llama-3-8b", "NVIDIA H200") == (
        "llama-3-8b-h200-engine",
        "measured on this GPU model (NVIDIA H200)",
    )
    name, why = profile_for_device("llama-3-8b", "NVIDIA A100-SXM4-80GB")
    assert name == DEFAULT_PROFILE and "on NVIDIA A100-SXM4-80GB" in why and "measured on NVIDIA H100" in why
    assert profile_for_device("llama-3.2-1b", "NVIDIA H200")[0] == DEFAULT_PROFILE
