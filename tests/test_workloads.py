import numpy as np
import pytest

from fairbatching.errors import ConfigError, WorkloadError
from fairbatching.workloads import LengthDist, default_workload, load_trace, synthetic_workload


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_csv(tmp_path):
    p = write(
        tmp_path,
        "az.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,8\n2023-11-16 18:17:05.5,100,1\n",
    )
    w = load_trace(p)
    assert [r.prompt_len for r in w.requests] == [4808, 3180, 100]
    assert [r.arrival for r in w.requests] == pytest.approx([0.0, 0.052, 1.52004])


def test_burstgpt_csv_skips_failed_zero_token_rows(tmp_path):
    p = write(
        tmp_path,
        "bg.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,0,1087,Conversation log\n46,GPT-4,200,30,230,API log\n",
    )
    w = load_trace(p)
    assert [(r.arrival, r.prompt_len, r.output_len) for r in w.requests] == [(0.0, 472, 18), (41.0, 200, 30)]


def test_mooncake_jsonl(tmp_path):
    p = write(
        tmp_path,
        "mc.jsonl",
        '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1]}\n\n'
        '{"timestamp": 1500, "input_length": 10, "output_length": 3}\n',
    )
    w = load_trace(p)
    assert [(r.arrival, r.prompt_len) for r in w.requests] == [(0.0, 6758), (1.5, 10)]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,5\n", "line 1: missing column.*GeneratedTokens"),
        (
            "b.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\nyesterday,5,1\n",
            "line 3: TIMESTAMP",
        ),
        (
            "c.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,-5,1\n",
            "line 2: ContextTokens must be >= 1",
        ),
        (
            "d.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,many\n",
            "line 2: GeneratedTokens is not",
        ),
        (
            "e.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1,\n',
            "line 2: not valid JSON",
        ),
        ("f.jsonl", '{"timestamp": 0, "input_length": 5}\n', "line 1: missing field.*output_length"),
        ("g.csv", "a,b,c\n1,2,3\n", "cannot tell the trace format"),
        ("h.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "has no requests"),
        (  # the file's line, counting the blank lines the reader skips
            "i.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n\n\n2023-11-16 18:17:04,abc,1\n",
            "line 5: ContextTokens is not a number: 'abc'",
        ),
        (  # and the lines of a quoted multi-line field
            "j.csv",
            'Timestamp,Model,Request tokens,Response tokens\n1,"multi\nline",10,10\n2,m,abc,10\n',
            "line 4: Request tokens is not a number",
        ),
    ],
)
def test_malformed_traces_name_file_and_line(tmp_path, name, text, message):
    p = write(tmp_path, name, text)
    with pytest.raises(WorkloadError, match=message) as info:
        load_trace(p)
    assert name in str(info.value) or "has no requests" in message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(WorkloadError, match="no such trace file"):
        load_trace(tmp_path / "nope.csv")
    p = write(tmp_path, "x.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n")
    with pytest.raises(WorkloadError, match="unknown trace format 'sharegpt'"):
        load_trace(p, fmt="sharegpt")


def test_rescale_preserves_order_and_hits_target_rate():
    w = synthetic_workload(500, qps=3.0, burstiness=2.0, seed=3)
    fast = w.rescaled(12.0)
    assert fast.qps == pytest.approx(12.0)
    assert [r.request_id for r in fast.requests] == [r.request_id for r in w.requests]
    gaps, fast_gaps = np.diff([r.arrival for r in w.requests]), np.diff([r.arrival for r in fast.requests])
    assert fast_gaps == pytest.approx(gaps / 4.0)
    with pytest.raises(ConfigError):
        w.rescaled(0)


def test_burstiness_raises_gap_variability():
    def cv2(w):
        g = np.diff([r.arrival for r in w.requests])
        return g.var() / g.mean() ** 2

    assert cv2(synthetic_workload(4000, 10, burstiness=1.0, seed=0)) == pytest.approx(1.0, abs=0.15)
    assert cv2(synthetic_workload(4000, 10, burstiness=6.0, seed=0)) > 4.0


def test_default_workload_is_deterministic_and_bad_lengths_rejected():
    assert default_workload(100).requests == default_workload(100).requests
    with pytest.raises(ConfigError):
        LengthDist(median=-1, sigma=1).sample(np.random.default_rng(0), 3)


def test_bundled_traces_load_whole():
    code, conv, moon = (load_trace(name) for name in ("azure-code", "azure-conv", "mooncake-conv"))
    assert (len(code), len(conv), len(moon)) == (8819, 19366, 12031)  # the CSVs end without a newline
    assert 2000 < code.stats()["prompt_mean"] < 2100 and 11000 < moon.stats()["prompt_mean"] < 13000
    assert moon.duration == pytest.approx(3536.999, rel=1e-6)


def test_bundled_traces_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = load_trace("azure-code", limit=50)
    moon = load_trace("mooncake-conv", limit=50)
    assert code.name == "azure-code" and code.meta["format"] == "azure" and len(code) == 50
    assert moon.name == "mooncake-conv" and moon.meta["format"] == "mooncake"
    assert code.requests[0].request_id == "AzureLLMInferenceTrace_code-0"  # ids as from the published file
    (tmp_path / "azure-code").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,1\n")
    assert len(load_trace("azure-code")) == 1  # a file under that name is explicit, so it wins


# SHA-256 of each published file (Azure: the CSV as downloaded; Mooncake: its "timestamp,input_length,
# output_length" lines, as the bundled copy drops hash_ids), taken from the public releases NOTICE names.
PUBLISHED_SHA256 = {
    "azure-code": "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    "azure-conv": "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    "mooncake-conv": "9f05e6bd75468bd1c23c9b68f3d645e9f57afeffff47c8fef3dad81055010604",
    "mooncake-synthetic": "d853cda5981ebf12ddd1d58096565cb71c37df6813623909a2b11bd77ff50c66",
}


def test_bundled_traces_match_the_published_files():
    """The package's copies hold what was published, checked against the releases' digests, not a copy."""
    import gzip
    import hashlib
    import json

    from fairbatching.workloads.bundled import BUNDLED

    assert set(PUBLISHED_SHA256) == set(BUNDLED)
    for name, digest in PUBLISHED_SHA256.items():
        with gzip.open(BUNDLED[name].path, "rb") as f:
            raw = f.read()
        if name.startswith("mooncake"):
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            raw = "".join(f"{r['timestamp']},{r['input_length']},{r['output_length']}\n" for r in rows).encode()
        assert hashlib.sha256(raw).hexdigest() == digest, name


def test_gzipped_user_traces_load(tmp_path):
    import gzip

    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write('{"timestamp": 0, "input_length": 10, "output_length": 2}\n')
        f.write('{"timestamp": 500, "input_length": 20, "output_length": 3}\n')
    w = load_trace(tmp_path / "t.jsonl.gz")
    assert w.name == "t" and w.meta["format"] == "mooncake" and w.requests[1].arrival == 0.5
    assert w.requests[1].request_id == "t-1"


def test_bundled_trace_shapes():
    from fairbatching.workloads.traces import bundled_shapes

    shapes = {s["name"]: s for s in bundled_shapes()}
    assert shapes["azure-conv"]["requests"] == 19366 and shapes["mooncake-conv"]["requests"] == 12031
    assert shapes["azure-code"]["license"] == "CC-BY-4.0" and shapes["mooncake-conv"]["license"] == "Apache-2.0"
    conv = shapes["azure-conv"]
    assert conv["prompt_p50"] <= conv["prompt_p90"] <= conv["prompt_p99"]
    assert 5 < conv["qps"] < 6 and 3400 < conv["duration_s"] < 3600
