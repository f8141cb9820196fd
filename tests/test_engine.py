"""The GPU engine's model, paged KV cache and step loop, checked on the CPU against Hugging Face transformers:
the same weights and prompts must give exactly the tokens of greedy ``generate``, for any chunking and any
batching the policies produce (preemption by recompute included)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace

import pytest
from conftest import assert_refused_before_work

torch = pytest.importorskip("torch", reason="the engine tests need the [gpu] extra (torch)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

from fairbatching.core.request import SLO  # noqa: E402
from fairbatching.costmodel.profile import load_profile  # noqa: E402
from fairbatching.engine.config import ModelConfig, model_config  # noqa: E402
from fairbatching.engine.loop import generate, replay  # noqa: E402
from fairbatching.engine.model import LlamaModel  # noqa: E402
from fairbatching.engine.runner import ModelRunner, SeqChunk  # noqa: E402
from fairbatching.errors import ConfigError  # noqa: E402
from fairbatching.metrics.summary import summarize  # noqa: E402
from fairbatching.policies import make_policy  # noqa: E402
from fairbatching.workloads.spec import RequestSpec, Workload  # noqa: E402

NEW_TOKENS = 10
SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _save(model, tmp_path_factory, name):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=10000.0, **SHAPE)).eval()
    return hf, _save(hf, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(256) for _ in range(n)] for n in (5, 37, 80, 13, 1, 24)]


def _hf_greedy(hf, prompts, n=NEW_TOKENS):
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(ids[0, len(p) :].tolist())
    return out


@pytest.fixture(scope="module")
def reference(llama, prompts):
    return _hf_greedy(llama[0], prompts)


COST = load_profile().cost_model()
POLICY_CASES = {
    "fairbatching-small-budget": ("fairbatching", dict(max_num_batched_tokens=16, min_chunk=4)),
    "fairbatching-default": ("fairbatching", {}),
    "sarathi-7-tokens": ("sarathi", dict(token_budget=7)),
    "vllm-2-seqs": ("vllm", dict(max_num_batched_tokens=12, max_num_seqs=2)),
    "prefill-first": ("prefill-first", dict(max_num_batched_tokens=40)),  # whole prompts, never chunked
}


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_engine_matches_hf_greedy_under_every_policy(llama, prompts, reference, case):
    name, options = POLICY_CASES[case]
    model = LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=llama[1])
    runner = ModelRunner(model, num_blocks=64, block_size=4, max_context=512)
    gen = generate(runner, make_policy(name, COST, **options), COST, prompts, NEW_TOKENS)
    assert gen.tokens == reference
    budget = options.get("max_num_batched_tokens", options.get("token_budget"))
    if budget and name != "prefill-first":
        assert gen.max_batch_tokens <= budget


def test_preemption_by_recompute_keeps_tokens_exact(llama, prompts, reference):
    model = LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=llama[1])
    runner = ModelRunner(model, num_blocks=31, block_size=4, max_context=512)  # 30 usable blocks: too few for all
    gen = generate(runner, make_policy("vllm", COST), COST, prompts, NEW_TOKENS)
    assert gen.preemptions > 0
    assert gen.tokens == reference
    assert runner.pool.usable == 30  # every block came back


def test_any_chunking_and_interleaving_matches_hf(llama, prompts, reference):
    """Random chunk sizes, several sequences per iteration, decodes mixed with other sequences' prefill."""
    model = LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=llama[1])
    rng = random.Random(7)
    for trial in range(3):
        runner = ModelRunner(model, num_blocks=400, block_size=rng.choice([1, 4, 16]), max_context=512)
        tokens = [list(p) for p in prompts]
        cached = [0] * len(prompts)
        blocks = [[] for _ in prompts]
        while any(len(t) - len(p) < NEW_TOKENS for t, p in zip(tokens, prompts, strict=True)):
            live = [i for i, p in enumerate(prompts) if len(tokens[i]) - len(p) < NEW_TOKENS]
            batch = rng.sample(live, rng.randint(1, len(live)))
            chunks = []
            for i in batch:
                n = rng.randint(1, len(tokens[i]) - cached[i])
                need = -(-(cached[i] + n) // runner.block_size) - len(blocks[i])
                blocks[i].extend(runner.pool.take(max(0, need)))
                chunks.append(
                    SeqChunk(
                        tokens[i][cached[i] : cached[i] + n], cached[i], blocks[i], cached[i] + n == len(tokens[i])
                    )
                )
            for i, c, t in zip(batch, chunks, runner.run(chunks), strict=True):
                cached[i] += len(c.token_ids)
                if t is not None:
                    tokens[i].append(t)
        got = [t[len(p) :] for t, p in zip(tokens, prompts, strict=True)]
        assert got == reference, f"trial {trial}"


def test_qwen2_with_qkv_bias_matches_hf(tmp_path_factory, prompts):
    torch.manual_seed(3)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    for layer in hf.model.layers:  # non-zero biases, so a dropped bias would show
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    path = _save(hf, tmp_path_factory, "qwen2")
    config = ModelConfig.from_dir(path)
    assert config.attention_bias
    model = LlamaModel(config, checkpoint=path)
    gen = generate(ModelRunner(model, 64, 4, 512), make_policy("sarathi", COST, token_budget=9), COST, prompts, 6)
    assert gen.tokens == _hf_greedy(hf, prompts, 6)


def test_llama31_rope_scaling_matches_hf(tmp_path_factory, prompts):
    torch.manual_seed(4)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    hf_config = transformers.LlamaConfig(
        rope_scaling={**scaling, "original_max_position_embeddings": 32}, rope_theta=500000.0, **SHAPE
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    path = _save(hf, tmp_path_factory, "llama31")
    config = ModelConfig.from_dir(path)
    assert config.rope_llama3_scaling == (8.0, 1.0, 4.0, 32)
    model = LlamaModel(config, checkpoint=path)
    gen = generate(ModelRunner(model, 64, 4, 512), make_policy("fairbatching", COST), COST, prompts, 6)
    assert gen.tokens == _hf_greedy(hf, prompts, 6)


def test_replay_accounts_for_every_request_on_the_wall_clock():
    model = LlamaModel(model_config("tiny"), seed=0)
    runner = ModelRunner(model, num_blocks=128, block_size=8, max_context=1024)
    specs = tuple(RequestSpec(f"r{i}", 0.01 * i, 20 + 7 * i, 3 + i % 4) for i in range(12))
    specs += (RequestSpec("too-long", 0.05, 2000, 4),)
    result = replay(runner, make_policy("fairbatching", COST), COST, Workload("w", specs), SLO(5.0, 1.0))
    ids = sorted(r.request_id for r in result.requests)
    assert ids == sorted(s.request_id for s in specs)
    by_id = {r.request_id: r for r in result.requests}
    assert by_id["too-long"].status == "rejected"
    for s in specs[:-1]:
        r = by_id[s.request_id]
        assert r.status == "finished" and r.num_generated == s.output_len
        assert r.token_times[0] >= s.arrival
        assert r.token_times == sorted(r.token_times)
    summary = summarize(result.policy, "w", result.requests, result.end_time, result.busy_time, result.preemptions)
    assert summary.finished == 12
    assert runner.pool.usable == 127


def test_replay_warms_the_engine_before_its_clock_starts(monkeypatch):
    """Warm-up (compilation, graph capture) costs minutes on a GPU: here it moves the clock 100 s, which every
    TTFT would carry if the replay's clock started first."""
    import time

    runner = ModelRunner(LlamaModel(model_config("tiny"), seed=0), num_blocks=64, block_size=8, max_context=256)
    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    calls = []

    def warmup():
        calls.append("warmup")
        offset[0] += 100.0

    monkeypatch.setattr(runner, "warmup", warmup)
    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda chunks: calls.append("run") or real_run(chunks))
    specs = tuple(RequestSpec(f"r{i}", 0.01 * i, 8, 2) for i in range(3))
    result = replay(runner, make_policy("vllm", COST), COST, Workload("w", specs), SLO(5.0, 1.0))
    assert calls[0] == "warmup" and calls.count("warmup") == 1 and "run" in calls
    assert all(r.token_times[0] - r.arrival < 50.0 for r in result.requests)


def test_kv_cache_is_sized_after_what_warm_up_was_measured_to_need():
    from fairbatching.engine import HEADROOM_BYTES, WARMUP_SLACK, kv_cache_blocks

    gib, block = 2**30, 2 * 2**20  # Llama-3-8B: 2 MiB per 16-token block
    # An H200 after the weights: ~124 GiB free. 0.9 of it left 12.4 GiB, less than warm-up took there.
    free, warm = 124 * gib, 17 * gib
    blocks = kv_cache_blocks(free, warm, block, 0.9)
    left = free - blocks * block
    assert (
        left >= warm * (1 + WARMUP_SLACK) + HEADROOM_BYTES and left < warm * (1 + WARMUP_SLACK) + HEADROOM_BYTES + block
    )
    assert blocks * block < 0.9 * free
    # Little warm-up need: the fraction caps the cache.
    assert kv_cache_blocks(free, 1 * gib, block, 0.8) == int(0.8 * free // block)
    with pytest.raises(ConfigError, match="no GPU memory left for the KV cache"):
        kv_cache_blocks(8 * gib, 8 * gib, block, 0.9)
    with pytest.raises(ConfigError, match="kv_memory_fraction"):
        kv_cache_blocks(free, warm, block, 1.5)


def test_resizing_the_kv_cache_leaves_the_runner_cold_and_refuses_blocks_in_use():
    from fairbatching.engine import build_engine

    runner = build_engine("tiny", device="cpu", num_blocks=32, block_size=8, max_context=256)
    assert runner.warmed and runner.pool.usable == 31
    runner.resize_kv(80)
    assert not runner.warmed and runner.pool.usable == 79 and runner.kv_cache.shape[2] == 80
    held = runner.pool.take(3)
    with pytest.raises(RuntimeError, match="3 blocks in use"):
        runner.resize_kv(40)
    runner.pool.give_back(held)
    runner.resize_kv(40)
    assert runner.pool.usable == 39


def test_bad_models_are_named():
    with pytest.raises(ConfigError, match="unknown model 'llama-9'"):
        model_config("llama-9")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf_config({"model_type": "gpt2", "hidden_size": 8}, "gpt2-dir")
    with pytest.raises(ConfigError, match="lacks 'intermediate_size'"):
        ModelConfig.from_hf_config(
            {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 9}
        )
    assert model_config("llama-3-70b@2").num_layers == 2


def test_checkpoint_with_missing_or_misshapen_tensors(tmp_path, llama):
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**json.loads((llama[1] / "config.json").read_text()), "intermediate_size": 96})
    )
    for f in llama[1].glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="has shape"):
        LlamaModel(ModelConfig.from_dir(tmp_path), checkpoint=tmp_path)


def test_triton_paged_kernel_matches_reference_in_interpreter():
    """The Triton paged attention kernel, run by Triton's CPU interpreter, against the SDPA reference: decodes,
    and prefill chunks (fresh, over earlier context, spanning several query tiles) with any number of splits,
    including splits that hold no key a query may see."""
    pytest.importorskip("triton", reason="the paged-kernel test needs triton")
    script = textwrap.dedent(
        """
        import torch
        from fairbatching.engine.attention import PrefillRouting, attention, build_metadata, chunk_block_q
        from fairbatching.engine.kernels import paged_attention
        torch.manual_seed(0)
        bs, nkv, nh, d = 4, 2, 6, 16
        k_cache, v_cache = torch.randn(200, bs, nkv, d), torch.randn(200, bs, nkv, d)
        chunks, next_block = [], 1
        for cached, new in [(0, 1), (6, 1), (32, 1), (69, 1), (0, 5), (3, 9), (50, 37), (17, 2)]:
            blocks = list(range(next_block, next_block + -(-(cached + new) // bs)))[::-1]
            next_block += len(blocks)
            chunks.append((cached, new, blocks))
        q = torch.randn(sum(n for _c, n, _b in chunks), nh, d)
        cpu = torch.device("cpu")
        ref = attention(q, k_cache, v_cache, build_metadata("reference", chunks, 4, bs, cpu))
        block_q = chunk_block_q(nh, nkv)
        meta = build_metadata("cuda", chunks, 4, bs, cpu, 40, PrefillRouting("paged", block_q=block_q))
        assert meta.paged_q == 53 and len(meta.chunk_tiles) == 6, meta.chunk_tiles
        assert meta.chunk_tiles[:, 0].tolist() == [4, 5, 6, 6, 6, 7] and meta.chunk_tiles[0, 1] == 4
        tables, lens, tiles = meta.block_tables, meta.context_lens, meta.chunk_tiles
        for splits in (1, 3, 8):
            got = paged_attention(q, k_cache, v_cache, tables, lens, tiles, splits, block_q, tile=16)
            assert (got - ref).abs().max() < 1e-4, splits
            got = paged_attention(q[:4], k_cache, v_cache, tables, lens, None, splits, tile=16)
            assert (got - ref[:4]).abs().max() < 1e-4, ("decodes alone", splits)
        # as a CUDA graph runs it: rows that are not decodes have length 0, spare tiles 0 rows
        padded_lens = torch.cat([lens, torch.zeros(len(q) - 4, dtype=torch.int32)])
        padded_tiles = torch.cat([tiles, torch.zeros(3, 4, dtype=torch.int32)])
        got = paged_attention(q, k_cache, v_cache, tables, padded_lens, padded_tiles, 2, block_q, tile=16)
        assert (got - ref).abs().max() < 1e-4
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_prefill_chunks_routed_to_triton_varlen_and_cudnn():
    """``auto``: chunks of up to 256 tokens (512 fresh) go to the Triton kernel (reading the blocks, in tiles
    of ``block_q`` tokens, table rows after the decodes'), fresh chunks of 1024+ tokens to cuDNN one by one (padded to a
    multiple of 256, so a few cuDNN plans serve every length), the rest share one varlen call; every token is
    written once and attended once."""
    from fairbatching.engine.attention import PrefillRouting, build_metadata

    cpu, auto = torch.device("cpu"), PrefillRouting("auto", block_q=16)
    decode, over_context, fresh = (9, 1, [1]), (300, 40, [3] * 22), (0, 64, [2] * 4)
    long_over_context, fresh_mid, fresh_long = (50, 600, [5] * 41), (0, 800, [6] * 50), (0, 2000, [4] * 125)
    chunks = [decode, over_context, fresh, long_over_context, fresh_mid, fresh_long]
    assert [auto.route(c, n) for c, n, _b in chunks[1:]] == ["paged", "paged", "varlen", "varlen", "cudnn"]
    meta = build_metadata("cuda", chunks, 1, 16, cpu, routing=auto)
    assert meta.paged_q == 104 and meta.context_lens.tolist() == [10] and meta.block_tables.shape[0] == 3
    assert meta.chunk_tiles.tolist() == [
        [1, 1, 16, 300],
        [1, 17, 16, 316],
        [1, 33, 8, 332],
        *([2, 41 + 16 * i, 16, 16 * i] for i in range(4)),
    ]
    assert meta.cu_q.tolist() == [0, 600, 1400] and meta.cu_k.tolist() == [0, 650, 1450]
    assert (meta.varlen_q, meta.varlen_k, meta.max_q, meta.max_k) == (1400, 1450, 800, 800)
    # the fresh 2000-token chunk runs padded to 2048 context rows (slot 0); the Triton chunks gather nothing
    assert meta.cudnn_spans == [(1400, 3400, 1450, 3498, True)]
    assert len(meta.prefill_context_slots) == 3498 and len(meta.slots) == 1 + 104 + 3400
    assert meta.prefill_context_slots[3450:].eq(0).all()
    with pytest.raises(ValueError, match="must be packed in"):
        build_metadata("cuda", [decode, fresh_long, over_context], 1, 16, cpu, routing=auto)
    only_varlen = build_metadata("cuda", chunks, 1, 16, cpu, routing=PrefillRouting("varlen"))
    assert only_varlen.cudnn_spans is None and only_varlen.paged_q == 0 and only_varlen.cu_q.tolist()[-1] == 3504
    only_cudnn = build_metadata("cuda", chunks, 1, 16, cpu, routing=PrefillRouting("cudnn"))
    assert only_cudnn.cu_q is None and [p for *_, p in only_cudnn.cudnn_spans] == [False, True, False, True, True]
    no_cudnn = PrefillRouting("auto", cudnn=False)
    assert no_cudnn.route(0, 2000) == "varlen" and no_cudnn.route(300, 40) == "paged"
    assert [auto.route(c, n) for c, n in ((100, 256), (100, 257), (0, 512), (0, 513))] == [
        "paged",
        "varlen",
        "paged",
        "varlen",
    ]
    with pytest.raises(ConfigError, match="prefill attention must be one of"):
        PrefillRouting("flash3")
    with pytest.raises(ConfigError, match="prefill attention must be one of"):
        ModelRunner(LlamaModel(model_config("tiny")), num_blocks=8, prefill_attention="flash3")


def test_graph_sizes_keep_only_those_that_save_time():
    """A mixed step is padded to the next kept size, so a size whose matmuls run slower than a larger one's
    (448 tokens on the H100: 15.8 ms against 10.3 ms at 512) must go, as must one that saves under 3%."""
    from fairbatching.engine.graph_sizes import CANDIDATE_TOKEN_SIZES, efficient_sizes

    times = {64: 5.8, 128: 6.2, 192: 7.5, 256: 7.0, 320: 7.8, 384: 10.0, 448: 15.8, 512: 10.3, 576: 12.5}
    assert efficient_sizes(times) == (64, 128, 256, 320, 512, 576)
    assert efficient_sizes({256: 10.0, 512: 10.2, 1024: 20.0}) == (512, 1024)  # 256 saves 2%
    assert efficient_sizes({256: 10.0, 512: 10.2, 1024: 20.0}, min_saving=0.0) == (256, 512, 1024)
    assert efficient_sizes({2048: 1.0}) == (2048,)
    assert tuple(sorted(set(CANDIDATE_TOKEN_SIZES))) == CANDIDATE_TOKEN_SIZES and CANDIDATE_TOKEN_SIZES[-1] == 2048
    with pytest.raises(ConfigError, match="no graph sizes"):
        efficient_sizes({})
    with pytest.raises(ConfigError, match="min_saving"):
        efficient_sizes(times, min_saving=1.0)


def test_fused_kernels_match_torch_and_hf_in_interpreter(llama, prompts, reference):
    """The fused Triton kernels (RoPE + KV write, add + RMSNorm, SwiGLU), run by Triton's CPU interpreter:
    each against its plain-torch twin, then the whole model on them must still give HF's greedy tokens."""
    pytest.importorskip("triton", reason="the fused-kernel test needs triton")
    script = textwrap.dedent(
        f"""
        import torch
        import torch.nn.functional as F
        from fairbatching.engine import fused
        from fairbatching.engine.model import LlamaModel, _rope
        from fairbatching.engine.config import ModelConfig
        from fairbatching.engine.loop import generate
        from fairbatching.engine.runner import ModelRunner
        from fairbatching.costmodel.profile import load_profile
        from fairbatching.policies import make_policy
        torch.manual_seed(0)
        t, nh, nkv, d, hidden, ff = 7, 6, 2, 16, 48, 40
        qkv = torch.randn(t, (nh + 2 * nkv) * d)
        freqs = torch.arange(t)[:, None] * torch.rand(d // 2)[None, :]
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        k_cache, v_cache = torch.zeros(2, 5, 4, nkv, d), torch.zeros(2, 5, 4, nkv, d)
        slots = torch.tensor([3, 17, 4, 9, 0, 19, 12])
        q = fused.rope_write_kv(qkv, cos, sin, k_cache[1], v_cache[1], slots, nh, nkv)
        assert (q - _rope(qkv[:, : nh * d].view(t, nh, d), cos, sin)).abs().max() < 1e-5
        k_ref = _rope(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d), cos, sin)
        assert (k_cache[1].view(-1, nkv, d)[slots] - k_ref).abs().max() < 1e-5
        assert torch.equal(v_cache[1].view(-1, nkv, d)[slots], qkv[:, (nh + nkv) * d :].view(t, nkv, d))
        assert k_cache[0].abs().max() == 0 and v_cache[1].view(-1, nkv, d)[1].abs().max() == 0
        x, res, w = torch.randn(t, hidden), torch.randn(t, hidden), torch.rand(hidden)
        out, res_out = fused.add_rms_norm(x, res, w, 1e-6)
        assert torch.allclose(res_out, x + res)
        assert (out - F.rms_norm(x + res, (hidden,), w, 1e-6)).abs().max() < 1e-5
        gu = torch.randn(t, 2 * ff)
        assert (fused.silu_mul(gu) - F.silu(gu[:, :ff]) * gu[:, ff:]).abs().max() < 1e-5
        path = {str(llama[1])!r}
        model = LlamaModel(ModelConfig.from_dir(path), checkpoint=path, fused_kernels=True)
        assert model.kernels is fused
        cost = load_profile().cost_model()
        runner = ModelRunner(model, num_blocks=64, block_size=4, max_context=512)
        gen = generate(runner, make_policy("fairbatching", cost, max_num_batched_tokens=16, min_chunk=4), cost,
                       {prompts!r}, {NEW_TOKENS})
        assert gen.tokens == {reference!r}, gen.tokens
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a CUDA GPU is told")
@pytest.mark.parametrize(
    "args,message",
    [
        (["replay", "--trace", "azure-conv", "-n", "300", "--qps", "20"], "`replay` needs a CUDA GPU; found none"),
        (["profile", "--out", "{tmp}/p"], "`profile` needs a CUDA GPU; found none"),
        (["replay", "--replicas", "2", "--device", "cuda"], "`replay` needs a CUDA GPU; found none"),
        (["replay", "--device", "cpu"], "--model llama-3-8b: 8.0B parameters is too large for a CPU run"),
        (["profile", "--out", "{tmp}/p", "--device", "cpu", "--model", "tiny"], "--device cpu needs --num-blocks"),
        (["replay", "--device", "tpu"], "--device 'tpu': use cuda, cuda:N or cpu"),
        (["compare", "--backend", "gpu", "--out", "{tmp}/p"], "`compare` needs a CUDA GPU; found none"),
        (["capacity", "--backend", "gpu", "--out", "{tmp}/p"], "`capacity` needs a CUDA GPU; found none"),
        (["evaluate", "--backend", "gpu", "--out", "{tmp}/p"], "`evaluate` needs a CUDA GPU; found none"),
        (["cluster", "--capacity", "--backend", "gpu", "--out", "{tmp}/p"], "`cluster` needs a CUDA GPU; found none"),
        (["compare", "--backend", "tpu", "--out", "{tmp}/p"], "--backend must be sim or gpu, got 'tpu'"),
    ],
)
def test_gpu_commands_without_a_gpu_exit_2_before_building_anything(tmp_path, args, message):
    assert_refused_before_work(tmp_path, args, message)


def short_outputs(trace_window):
    """``calibrate.trace_window`` with every output of the held-out window cut to 4 tokens: its own requests'
    prompts, but a CPU replay of hundreds of decode steps per policy is more than a test should wait for."""

    def window(requests, start):
        w = trace_window(requests, start)
        if start == 0:  # the calibration window, as it is
            return w
        return Workload(w.name, tuple(replace(r, output_len=4) for r in w.requests), w.meta)

    return window


def test_profile_and_replay_commands_on_the_cpu(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fairbatching.cli import app
    from fairbatching.costmodel.profile import load_profile as load
    from fairbatching.evaluation import calibrate

    common = ["--model", "tiny", "--device", "cpu", "--num-blocks", "400", "--max-context", "8192"]
    # The grid, then the serving calibration: 2 requests per policy, planned for an SLO a CPU engine can meet;
    # then the validation on 1 held-out request per policy (its output cut short).
    calibration = ["--calibration-requests", "2", "--validation-requests", "1", "--ttft-slo", "30", "--tpot-slo", "5"]
    monkeypatch.setattr(calibrate, "trace_window", short_outputs(calibrate.trace_window))
    res = CliRunner().invoke(
        app, ["profile", "--out", str(tmp_path), "--grid", "quick", "--repeats", "1", *common, *calibration]
    )
    assert res.exit_code == 0, res.output
    check = load(str(tmp_path / "profile.json")).fit["validation"]
    assert check["window"]["start"] == calibrate.VALIDATION_START and check["window"]["requests"] == 1
    assert f"validation: {check['verdict']}" in " ".join(res.output.split())
    assert (tmp_path / "validation_steps.csv").read_text().count("\n") == check["step_mape"]["steps"] + 1
    listed = CliRunner().invoke(app, ["profiles", str(tmp_path / "profile.json"), "--json"])
    assert json.loads(listed.stdout)[-1]["validation"] == check
    prof = load(str(tmp_path / "profile.json"))
    assert prof.source == "measured" and prof.kv.num_blocks == 399 and prof.fit["holdout_rows"] >= 1
    assert (tmp_path / "rows.csv").read_text().startswith("kind,new_tokens")
    record = prof.fit["calibration"]
    assert record["requests"] == 2 and record["workload"] == "azure-conv" and record["slo"] == {"ttft": 30, "tpot": 5}
    assert sum(r.get("steps", 0) for r in record["replays"]) == record["steps"] > 0
    grid = load(str(tmp_path / "grid_profile.json"))
    assert prof.note.startswith("serving-calibrated") and prof.fit["grid_fit"] == grid.fit
    assert (tmp_path / "calibration_steps.csv").read_text().count("\n") == record["steps"] + 1
    res = CliRunner().invoke(
        app,
        [
            "replay",
            *common,
            "-n",
            "6",
            "--qps",
            "50",
            "--profile",
            str(tmp_path / "profile.json"),
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"] == 6
    # One engine with node admission: what its budget refuses is counted (and shown) beside what it served.
    res = CliRunner().invoke(
        app,
        ["replay", *common, "-n", "6", "--qps", "50", "--profile", str(tmp_path / "profile.json")]
        + ["--admission", "reject", "--ttft-slo", "30", "--tpot-slo", "5", "--out", str(tmp_path / "adm")],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "refused" in res.output
    summary = json.loads((tmp_path / "adm" / "summary.json").read_text())
    assert summary["requests"] == 6 and summary["finished"] + summary["rejected"] == 6


def test_the_validation_is_computed_from_the_held_out_steps_and_fails_a_wrong_profile():
    """`fairbatching profile`'s validation on a tiny CPU engine: its step error is the validated profile's price
    of the held-out replay's own steps against their periods, its simulated side is the simulator's run of the
    same requests, and a profile that prices every step 1000x too dear fails with a verdict that says so."""
    from fairbatching.core.kv import KVCacheConfig
    from fairbatching.costmodel.fit import fit_cost_model
    from fairbatching.costmodel.serving import period_mape
    from fairbatching.engine import build_engine
    from fairbatching.evaluation import calibrate
    from fairbatching.runs import Experiment

    runner = build_engine("tiny", device="cpu", num_blocks=400, max_context=8192)
    base = load_profile()
    times = {k: 1000 * v for k, v in asdict(base.params).items() if k != "p"}  # the price is homogeneous in these
    wrong = replace(base, params=replace(base.params, **times), kv=KVCacheConfig(runner.pool.usable, 16))
    slo = SLO(1000.0, 100.0)  # loose enough for 1000x prices to plan
    held = short_outputs(calibrate.trace_window)(2, calibrate.VALIDATION_START).rescaled(50.0)
    window = calibrate.CalibrationWindow(held, 50.0, 50.0, calibrate.VALIDATION_START)
    val = calibrate.validate(runner, wrong, window, slo, policies=("fairbatching", "sarathi"))
    record = val.record
    assert [c["policy"] for c in record["policies"]] == ["fairbatching", "sarathi"]
    assert record["step_mape"]["steps"] == len(val.steps) == sum(c["steps"] for c in record["policies"])
    assert {k: record["step_mape"][k] for k in ("decode", "prefill", "all")} == period_mape(
        wrong.cost_model(), val.steps
    )
    assert record["step_mape"]["all"] > 10 * calibrate.STEP_MAPE_TOLERANCE
    assert period_mape(fit_cost_model(val.steps).model, val.steps)["all"] < record["step_mape"]["all"] / 10
    sim = Experiment(held, wrong, slo, max_model_len=runner.max_context).run("sarathi").summary
    assert record["policies"][1]["sim"]["slo_attainment"] == round(sim.slo_attainment, 4)
    assert not record["passed"] and record["verdict"].startswith("FAILED")
    assert f"requests {calibrate.VALIDATION_START}-{calibrate.VALIDATION_START + 1}" in record["window"]["held_out"]


@pytest.mark.parametrize("policy", ["fairbatching", "vllm"])
def test_a_cached_prefix_gives_the_tokens_computed_from_scratch(llama, policy):
    """Prefix caching on the engine: later prompts that share an earlier one's prefix (whole blocks of it, and
    all of it) start after the cached blocks, and still produce exactly Hugging Face's greedy tokens."""
    rng = random.Random(3)
    base = [rng.randrange(256) for _ in range(41)]
    prompts = [base + [5, 6, 7], base + [9], base[:40], base + [5, 6, 7]]
    reference = _hf_greedy(llama[0], prompts)
    model = LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=llama[1])
    runner = ModelRunner(model, num_blocks=64, block_size=4, max_context=512)
    gen = generate(
        runner, make_policy(policy, COST), COST, prompts, NEW_TOKENS, prefix_caching=True, submit_after=[0, 3, 6, 9]
    )
    assert gen.prefix_hit_tokens >= 3 * 36  # each later prompt reused at least 9 blocks of 4 tokens
    assert gen.tokens == reference


def test_preempted_requests_resume_from_their_cached_blocks_exactly(llama, prompts, reference):
    """Under memory pressure a preempted request finds its own released blocks still cached (until evicted):
    resuming from them, or recomputing what was evicted, gives the same tokens."""
    model = LlamaModel(ModelConfig.from_dir(llama[1]), checkpoint=llama[1])
    runner = ModelRunner(model, num_blocks=31, block_size=4, max_context=512)
    gen = generate(runner, make_policy("vllm", COST), COST, prompts, NEW_TOKENS, prefix_caching=True)
    assert gen.preemptions > 0 and gen.prefix_hit_tokens == 0  # first admissions find nothing cached
    assert gen.tokens == reference
