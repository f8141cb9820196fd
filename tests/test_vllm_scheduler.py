"""The vLLM integration against real vLLM on the CPU: vLLM builds our scheduler from its dotted name, and
the behaviours of vLLM's own scheduler tests hold (a request completes, chunked prefill, preemption when
KV runs out, abort, prefix-cache hits, max_num_seqs, max_model_len), plus FairBatching's own."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM integration tests need the [vllm] extra")

import torch  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from fairbatching.costmodel.adaptive import AdaptiveCostModel  # noqa: E402
from fairbatching.errors import ConfigError  # noqa: E402

DOTTED = "fairbatching.integrations.vllm.FairBatchingScheduler"
init_none_hash(sha256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "torch_dtype": "float16",
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def make_scheduler(
    model_dir,
    monkeypatch,
    max_num_seqs=16,
    max_num_batched_tokens=256,
    num_blocks=1000,
    block_size=16,
    max_model_len=2048,
    prefix_caching=False,
    env=None,
    scheduler_cls=DOTTED,
    additional_config=None,
    async_scheduling=None,
):
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    sched_cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
        scheduler_cls=scheduler_cls,
        async_scheduling="Async" in scheduler_cls if async_scheduling is None else async_scheduling,
    )
    model_cfg = ModelConfig(
        model=model_dir, dtype="float16", seed=0, skip_tokenizer_init=True, max_model_len=max_model_len
    )
    cache_cfg = CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching)
    config = VllmConfig(
        scheduler_config=sched_cfg,
        model_config=model_cfg,
        cache_config=cache_cfg,
        device_config=DeviceConfig("cpu"),
        additional_config=additional_config or {},
    )
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size, num_kv_heads=1, head_size=1, dtype=torch.float32))
        ],
    )
    cache_cfg.num_gpu_blocks = num_blocks
    cls = config.scheduler_config.get_scheduler_cls()  # vLLM's own config path, from the dotted name
    return cls(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=block_size,
        log_stats=True,
    )


def make_requests(n, prompt_len=10, max_tokens=8, same_prompt=False, block_size=16, extra_args=None, start=0):
    hasher = get_request_block_hasher(block_size, sha256)
    out = []
    for i in range(start, start + n):
        params = SamplingParams(ignore_eos=False, max_tokens=max_tokens, extra_args=extra_args)
        prompt = [7] * prompt_len if same_prompt else [(i * 31 + j) % 900 for j in range(prompt_len)]
        out.append(Request(f"{i}", prompt, params, None, block_hasher=hasher))
    return out


def step(sched, token=5):
    """One engine step: schedule, then every request whose scheduled tokens reach its end samples ``token``."""
    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        r = sched.requests[rid]
        sampled.append([token] if r.num_computed_tokens >= r.num_tokens else [])
    mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled)
    engine_outputs = sched.update_from_output(out, mro)
    finished = set()
    for eo in engine_outputs.values():
        for o in eo.outputs:
            if o.finish_reason is not None:
                finished.add(o.request_id)
    return out, finished


def run_all(sched, requests, max_steps=500, check=None):
    for r in requests:
        sched.add_request(r)
    done: set[str] = set()
    for _ in range(max_steps):
        if not sched.has_requests():
            break
        out, finished = step(sched)
        if check:
            check(sched, out)
        assert not (finished & done), "a request finished twice"
        done |= finished
    return done


def test_vllm_loads_the_class_from_its_dotted_name(model_dir, monkeypatch):
    from fairbatching.integrations.vllm import FairBatchingScheduler

    sched = make_scheduler(model_dir, monkeypatch)
    assert type(sched) is FairBatchingScheduler
    assert sched.fb_policy.name == "fairbatching"


def test_async_variant_completes_requests(model_dir, monkeypatch):
    from fairbatching.integrations.vllm import AsyncFairBatchingScheduler

    sched = make_scheduler(
        model_dir, monkeypatch, scheduler_cls="fairbatching.integrations.vllm.AsyncFairBatchingScheduler"
    )
    assert type(sched) is AsyncFairBatchingScheduler
    reqs = make_requests(4, prompt_len=30, max_tokens=5)
    assert run_all(sched, reqs) == {r.request_id for r in reqs}
    assert all(len(r.output_token_ids) == 5 for r in reqs)


def test_online_calibration_learns_from_every_executed_step(model_dir, monkeypatch):
    """As in every backend's step loop: each executed step's measured time goes to ``Policy.observe_step``, and
    the policy plans on the corrected model (CPU steps take microseconds against the H100 profile's ms)."""
    sched = make_scheduler(model_dir, monkeypatch)
    model = sched.fb_policy.cost_model
    assert isinstance(model, AdaptiveCostModel) and model.factors == (1.0, 1.0)
    seen, observe = [], sched.fb_policy.observe_step
    monkeypatch.setattr(sched.fb_policy, "observe_step", lambda *step: seen.append(step) or observe(*step))
    executed = 0

    def check(sched, out):
        nonlocal executed
        executed += out.total_num_scheduled_tokens > 0

    reqs = make_requests(4, prompt_len=30, max_tokens=30)
    assert len(run_all(sched, reqs, check=check)) == 4
    assert len(seen) == executed >= 30  # a step per token of output at least
    assert all(seconds > 0 for *_features, seconds in seen)
    assert model.factors[0] < 0.5  # decode-only steps priced from what they took here
    assert sched.fb_policy.cost_model is model


def test_requests_complete_with_length_finish(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch)
    reqs = make_requests(5, prompt_len=20, max_tokens=6)
    done = run_all(sched, reqs)
    assert done == {r.request_id for r in reqs}
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED and len(r.output_token_ids) == 6 for r in reqs)
    assert not sched.fb_views and not sched.running and not sched.waiting


def test_chunked_prefill_respects_the_token_budget(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, max_num_batched_tokens=64)
    reqs = make_requests(2, prompt_len=300, max_tokens=3)
    chunks = []

    def check(s, out):
        assert out.total_num_scheduled_tokens <= 64
        chunks.extend(n for rid, n in out.num_scheduled_tokens.items() if n > 1)

    assert run_all(sched, reqs, check=check) == {"0", "1"}
    assert len(chunks) >= 10  # 600 prompt tokens through a 64-token budget


def test_preemption_when_kv_runs_out_loses_nothing(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, num_blocks=12, block_size=16, max_num_batched_tokens=512)
    reqs = make_requests(4, prompt_len=40, max_tokens=40)  # 4 x 80 tokens need 20 blocks; 11 usable
    preempted = set()

    def check(s, out):
        preempted.update(out.preempted_req_ids or ())

    done = run_all(sched, reqs, max_steps=2000, check=check)
    assert done == {r.request_id for r in reqs}
    assert preempted, "expected vLLM to preempt under KV pressure"
    assert all(len(r.output_token_ids) == 40 for r in reqs)


def test_abort_removes_the_request_everywhere(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch)
    reqs = make_requests(3, prompt_len=10, max_tokens=50)
    for r in reqs:
        sched.add_request(r)
    step(sched)
    step(sched)
    sched.finish_requests(["1"], RequestStatus.FINISHED_ABORTED)
    assert "1" not in sched.fb_views and "1" not in sched.requests
    for _ in range(100):
        if not sched.has_requests():
            break
        step(sched)
    assert reqs[1].status == RequestStatus.FINISHED_ABORTED
    assert len(reqs[0].output_token_ids) == 50 and len(reqs[2].output_token_ids) == 50


def test_prefix_cache_hits_are_used(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, prefix_caching=True)
    first, second = make_requests(2, prompt_len=64, max_tokens=2, same_prompt=True)
    run_all(sched, [first])
    sched.add_request(second)
    out, _ = step(sched)
    assert out.num_scheduled_tokens["1"] <= 64 - 48  # three full shared blocks came from the prefix cache
    assert second.num_computed_tokens == 64


def test_max_num_seqs_caps_the_running_set(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, max_num_seqs=3)

    def check(s, out):
        assert len(s.running) <= 3 and len(out.num_scheduled_tokens) <= 3

    assert len(run_all(sched, make_requests(8, prompt_len=12, max_tokens=5), check=check)) == 8


def test_max_model_len_caps_generation(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, max_model_len=64)
    (req,) = make_requests(1, prompt_len=50, max_tokens=100)
    assert run_all(sched, [req]) == {"0"}
    assert req.num_tokens <= 64 and req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def _decoding(sched, n, prompt_len, tpot, ttft=5.0):
    reqs = make_requests(n, prompt_len=prompt_len, max_tokens=500, extra_args={"ttft_slo": ttft, "tpot_slo": tpot})
    for r in reqs:
        sched.add_request(r)
    while any(r.num_output_tokens < 2 for r in reqs):
        step(sched)
    return reqs


def test_prefill_goes_ahead_of_decodes_with_slack(model_dir, monkeypatch):
    """Decodes far ahead of their envelope (TPOT SLO 10 s) yield the budget to a waiting prompt."""
    sched = make_scheduler(
        model_dir, monkeypatch, max_num_seqs=64, max_num_batched_tokens=64, env={"FAIRBATCHING_CALIBRATION": "off"}
    )
    _decoding(sched, 40, prompt_len=8, tpot=10.0)
    (prompt,) = make_requests(1, prompt_len=200, max_tokens=4, start=100)
    sched.add_request(prompt)
    out, _ = step(sched)
    assert out.num_scheduled_tokens.get("100", 0) >= 32  # the prompt got most of the 64-token budget
    assert sum(1 for rid in out.num_scheduled_tokens if rid != "100") < 40  # some slack decodes waited
    assert len(sched.running) == 41  # the waiting ones are still running, not lost


def test_urgent_decodes_are_never_displaced(model_dir, monkeypatch):
    """Decodes already past their next deadline all run before any prefill token."""
    sched = make_scheduler(
        model_dir, monkeypatch, max_num_seqs=64, max_num_batched_tokens=64, env={"FAIRBATCHING_CALIBRATION": "off"}
    )
    decodes = _decoding(sched, 20, prompt_len=8, tpot=0.02)
    (prompt,) = make_requests(1, prompt_len=400, max_tokens=4, start=100)
    sched.add_request(prompt)
    behind = max(sched.fb_views[r.request_id].next_deadline for r in decodes)
    while time.time() <= behind:  # until every decode is behind its envelope
        time.sleep(0.005)
    out, _ = step(sched)
    assert all(out.num_scheduled_tokens.get(r.request_id) == 1 for r in decodes)
    assert out.num_scheduled_tokens.get("100", 0) <= 64 - 20


def _recording(sched) -> list:
    """The plans ``sched``'s policy makes, as it makes them."""
    plans, plan = [], sched.fb_policy.schedule
    sched.fb_policy.schedule = lambda state: plans.append(plan(state)) or plans[-1]
    return plans


def test_planned_decodes_run_even_behind_a_running_prefill(model_dir, monkeypatch):
    """vLLM gives each running request what it asks for, in list order: a long prompt mid-prefill ahead of the
    decodes would take the whole budget, unless the steered list puts the planned decodes first."""
    sched = make_scheduler(
        model_dir, monkeypatch, max_num_seqs=64, max_num_batched_tokens=64, env={"FAIRBATCHING_CALIBRATION": "off"}
    )
    plans = _recording(sched)
    (prompt,) = make_requests(1, prompt_len=1800, max_tokens=4, start=100, extra_args={"ttft_slo": 30, "tpot_slo": 1})
    sched.add_request(prompt)
    step(sched)  # the prompt is running, mid-prefill, first in vLLM's running list
    for r in make_requests(10, prompt_len=8, max_tokens=200, extra_args={"ttft_slo": 5.0, "tpot_slo": 0.02}):
        sched.add_request(r)
    starved = 0
    for _ in range(30):
        plans.clear()
        out, _ = step(sched)
        decodes = [r.request_id for r, n in plans[-1].items if n == 1] if plans else []
        starved += any(rid not in out.num_scheduled_tokens for rid in decodes)
    assert sched.running[0].request_id == "100" and prompt.num_computed_tokens > 64  # the case arose
    assert starved == 0


def test_the_requests_the_plan_preempts_are_the_ones_vllm_preempts(model_dir, monkeypatch):
    sched = make_scheduler(model_dir, monkeypatch, num_blocks=12, block_size=16, max_num_batched_tokens=512)
    plans = _recording(sched)
    reqs = make_requests(4, prompt_len=40, max_tokens=40)  # 4 x 80 tokens need 20 blocks; 11 usable
    chosen, preempted = set(), set()

    def check(s, out):
        if plans:
            chosen.update(r.request_id for r in plans[-1].preempted)
        preempted.update(out.preempted_req_ids or ())
        plans.clear()

    assert run_all(sched, reqs, max_steps=2000, check=check) == {r.request_id for r in reqs}
    assert chosen and preempted == chosen


def test_planned_decodes_with_draft_tokens_get_room_for_them(model_dir, monkeypatch):
    """With speculative decoding a decode verifies its drafts: the budget holds 1 + k tokens for each."""
    sched = make_scheduler(model_dir, monkeypatch, max_num_seqs=64, max_num_batched_tokens=256)
    plans = _recording(sched)
    _decoding(sched, 32, prompt_len=8, tpot=0.05, ttft=2.0)
    for r in sched.running:
        r.spec_token_ids = [1, 2, 3]  # as vLLM's update_draft_token_ids sets them
    plans.clear()
    out = sched.schedule()
    assert all(out.num_scheduled_tokens.get(r.request_id) == 4 for r, n in plans[-1].items if n == 1)
    assert out.total_num_scheduled_tokens == 4 * 32


@pytest.fixture
def vllm_log(caplog):
    """vLLM's configured logger does not propagate to the root, where caplog listens: listen on it directly."""
    vllm_logger = logging.getLogger("vllm")
    attach = not vllm_logger.propagate
    if attach:
        vllm_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="vllm")
    yield caplog
    if attach:
        vllm_logger.removeHandler(caplog.handler)


def ours(caplog):
    return [r for r in caplog.records if r.name == "vllm.fairbatching"]


def test_per_request_slo_from_extra_args(model_dir, monkeypatch, vllm_log):
    caplog = vllm_log
    sched = make_scheduler(model_dir, monkeypatch, env={"FAIRBATCHING_TTFT_SLO": "3"})
    good = make_requests(1, extra_args={"ttft_slo": 0.25, "tpot_slo": 0.02})[0]
    bad = make_requests(1, extra_args={"ttft_slo": -1}, start=1)[0]
    plain = make_requests(1, start=2)[0]
    for r in (good, bad, plain):
        sched.add_request(r)
    assert sched.fb_views["0"].slo.ttft == 0.25 and sched.fb_views["0"].slo.tpot == 0.02
    assert sched.fb_views["1"].slo.ttft == 3.0 and "invalid per-request SLO" in caplog.text
    assert sched.fb_views["2"].slo.ttft == 3.0


def test_sarathi_policy_and_config_file(model_dir, monkeypatch, tmp_path):
    cfg = tmp_path / "fb.json"
    cfg.write_text(json.dumps({"policy": "sarathi", "tpot_slo": 0.05, "policy_options": {"token_budget": 32}}))
    sched = make_scheduler(model_dir, monkeypatch, env={"FAIRBATCHING_CONFIG": str(cfg)})
    assert sched.fb_policy.name == "sarathi" and sched.fb_policy.max_num_batched_tokens == 32

    def check(s, out):
        assert out.total_num_scheduled_tokens <= 32

    assert len(run_all(sched, make_requests(3, prompt_len=70, max_tokens=3), check=check)) == 3


def test_bad_config_is_named_in_one_log_line(model_dir, monkeypatch, vllm_log):
    with pytest.raises(ConfigError, match="FAIRBATCHING_POLICY='fifo': unknown policy"):
        make_scheduler(model_dir, monkeypatch, env={"FAIRBATCHING_POLICY": "fifo"})
    (record,) = ours(vllm_log)
    assert record.levelname == "ERROR" and "FAIRBATCHING_POLICY='fifo'" in record.getMessage()


def test_policy_options_out_of_range_are_named(model_dir, monkeypatch):
    config = {"fairbatching": {"policy": "sarathi", "policy_options": {"token_budget": -5}}}
    with pytest.raises(ConfigError, match="--additional-config fairbatching.policy_options=.*-5"):
        make_scheduler(model_dir, monkeypatch, additional_config=config)


def test_settings_from_additional_config_and_the_startup_line(model_dir, monkeypatch, vllm_log):
    config = {"fairbatching": {"ttft_slo": 1.5, "calibration": "off"}}
    sched = make_scheduler(model_dir, monkeypatch, additional_config=config, env={"FAIRBATCHING_TPOT_SLO": "0.05"})
    assert (sched.fb_settings.ttft_slo, sched.fb_settings.tpot_slo) == (1.5, 0.05)
    assert not isinstance(sched.fb_policy.cost_model, AdaptiveCostModel)  # plans on the profile as it is
    (line,) = [r.getMessage() for r in ours(vllm_log) if r.levelname == "INFO"]
    assert line.startswith("FairBatchingScheduler (sync scheduling): policy=fairbatching ttft_slo=1.5s tpot_slo=0.05s")
    assert "profile=llama-3-8b-h100-engine (default) calibration=off" in line
    assert "tpot_slo from FAIRBATCHING_TPOT_SLO" in line and "pab_metrics=off" in line


@pytest.mark.parametrize(
    ("cls", "async_scheduling", "wanted"),
    [("FairBatchingScheduler", True, "AsyncFairBatchingScheduler"), ("AsyncFairBatchingScheduler", False, None)],
)
def test_a_class_in_the_other_scheduling_loop_is_warned_about(
    model_dir, monkeypatch, vllm_log, cls, async_scheduling, wanted
):
    dotted = f"fairbatching.integrations.vllm.{cls}"
    make_scheduler(model_dir, monkeypatch, scheduler_cls=dotted, async_scheduling=async_scheduling)
    (warning,) = [
        r.getMessage() for r in vllm_log.records if r.name == "vllm.fairbatching" and r.levelname == "WARNING"
    ]
    assert f"use --scheduler-cls fairbatching.integrations.vllm.{wanted or 'FairBatchingScheduler'} " in warning
    vllm_log.clear()
    make_scheduler(model_dir, monkeypatch, scheduler_cls=dotted, async_scheduling=not async_scheduling)
    assert not [r for r in ours(vllm_log) if r.levelname == "WARNING"]


def _outside_address():
    """An address of this machine other than loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: sends nothing, picks the outgoing interface
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_pab_is_exported_as_prometheus_gauges(model_dir, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sched = make_scheduler(model_dir, monkeypatch, env={"FAIRBATCHING_METRICS_PORT": str(port)})
    for r in make_requests(3, prompt_len=30, max_tokens=20):
        sched.add_request(r)
    step(sched)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("fairbatching_prefill_admission_budget_tokens"))
    assert float(line.split()[-1]) == sched.fb_budget.tokens > 0
    assert sched.admission_budget().free_slots == 16 - 3
    outside = _outside_address()
    if outside is not None:  # bound to loopback only: not reachable on the machine's other address
        with pytest.raises(OSError):
            socket.create_connection((outside, port), timeout=2).close()


def test_metrics_port_in_use_is_named(model_dir, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"FAIRBATCHING_METRICS_PORT={port}: cannot serve the PAB metrics"):
            make_scheduler(model_dir, monkeypatch, env={"FAIRBATCHING_METRICS_PORT": str(port)})


def test_unsupported_vllm_version_is_refused(monkeypatch):
    from fairbatching.integrations.vllm import scheduler

    monkeypatch.setattr(scheduler.vllm, "__version__", "0.20.1")
    with pytest.raises(ConfigError, match="supports vLLM >= 0.33"):
        scheduler._check_version()


def test_mixed_load_under_kv_pressure_keeps_every_request_once(model_dir, monkeypatch):
    """Slack decodes hidden, prompts admitted, vLLM preempting: each request is in exactly one list."""
    sched = make_scheduler(model_dir, monkeypatch, max_num_seqs=12, max_num_batched_tokens=96, num_blocks=40)
    reqs = []
    for i in range(24):
        reqs += make_requests(
            1,
            prompt_len=10 + 17 * (i % 5),
            max_tokens=5 + 7 * (i % 3),
            start=i,
            extra_args={"ttft_slo": 1.0 + i % 3, "tpot_slo": 0.05 * (1 + i % 4)},
        )

    def check(s, out):
        ids = [r.request_id for r in s.running] + [r.request_id for r in s.waiting]
        ids += [r.request_id for r in s.kv_holding_waiting]
        assert len(ids) == len(set(ids)) == len(s.requests)
        assert len(s.running) <= 12 and out.total_num_scheduled_tokens <= 96

    assert run_all(sched, reqs, max_steps=3000, check=check) == {r.request_id for r in reqs}
    assert all(len(r.output_token_ids) == 5 + 7 * (int(r.request_id) % 3) for r in reqs)
