"""What `vllm serve` needs to run on a machine without a GPU: a tiny model directory and a stand-in executor.

``StandInExecutor`` replaces only the model forward. It is a vLLM ``UniProcExecutor`` whose worker reports a
KV-cache spec (a few layers of full attention) and, for each step, returns one made-up token for every
request whose scheduled chunk reaches the end of its known tokens, after a few milliseconds of "compute".
(Importing this module also lifts the CPU platform's override that turns async scheduling off: see
``_keep_async_scheduling``.)
Everything else is vLLM's own: the OpenAI API server, tokenizer, detokenizer, engine-core process and loop,
KV-cache manager and the scheduler class given by ``--scheduler-cls``. Its output is returned through an
``AsyncModelRunnerOutput`` that becomes ready when the step's time is up, as a GPU step would, so vLLM's
async-scheduling loop overlaps scheduling with the step exactly as it does on a GPU. Model speed, CUDA
graphs and kernels are not exercised: only a GPU shows those.

Use: ``vllm serve DIR --distributed-executor-backend vllm_standin.StandInExecutor`` with this directory on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from vllm.v1.executor.uniproc_executor import UniProcExecutor
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput
from vllm.v1.worker.worker_base import CompilationTimes

STEP_SECONDS = float(os.environ.get("STANDIN_STEP_SECONDS", "0.004"))
KV_BYTES = 64 << 20  # the "free GPU memory" offered to the KV cache
LAYERS, KV_HEADS, HEAD_SIZE = 2, 2, 16
WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["<unk>", "<s>", "</s>"]
TOKEN = len(SPECIAL) + 7  # the made-up token every step returns ("w7"): never EOS, so requests run to max_tokens


def build_model_dir(path: Path) -> Path:
    """A tiny Llama checkpoint directory: config, random weights and a word-level tokenizer built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=KV_HEADS * HEAD_SIZE * 2,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=KV_HEADS * 2,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        torch_dtype="float16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": vocab["</s>"]}))
    return path


class _Output(AsyncModelRunnerOutput):
    """A step's result, ready once the step's compute time has passed."""

    def __init__(self, output: ModelRunnerOutput, ready_at: float) -> None:
        self.output, self.ready_at = output, ready_at

    def get_output(self) -> ModelRunnerOutput:
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        return self.output

    def get_kv_connector_output(self):
        return None


class _Worker:
    """The worker interface vLLM's engine core calls, minus the model."""

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size or 16
        self.known: dict[str, int] = {}  # tokens each request has so far (prompt + made-up outputs)
        self.pending: ModelRunnerOutput | None = None
        self.busy_until = 0.0

    def get_kv_cache_spec(self):
        spec = FullAttentionSpec(
            block_size=self.block_size, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float16
        )
        return {f"model.layers.{i}.self_attn.attn": spec for i in range(LAYERS)}

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["LBNHC"]

    def set_kv_cache_layout(self, *args) -> None:
        return None

    def determine_available_memory(self) -> int:
        return KV_BYTES

    def get_simple_cpu_offload_num_cpu_blocks(self) -> None:
        return None

    def initialize_from_config(self, kv_cache_configs) -> None:
        config = kv_cache_configs[0] if isinstance(kv_cache_configs, list) else kv_cache_configs
        self.vllm_config.cache_config.num_gpu_blocks = config.num_blocks

    def compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(0.0, 0.0)

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def supports_draft_weight_updates(self) -> bool:
        return False

    def execute_model(self, scheduler_output) -> ModelRunnerOutput | None:
        """Note which requests get a token this step; ``sample_tokens`` hands the result over. A step with
        nothing scheduled returns its (empty) output at once, as vLLM's model runner does."""
        for r in scheduler_output.scheduled_new_reqs:
            self.known[r.req_id] = len(r.prompt_token_ids or ())
        cached = scheduler_output.scheduled_cached_reqs
        computed = dict(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        computed.update({r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs})
        for rid, tokens in cached.all_token_ids.items():  # resumed after preemption
            self.known.setdefault(rid, len(tokens))
        ids = list(scheduler_output.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            done = computed.get(rid, 0) + scheduler_output.num_scheduled_tokens[rid]
            if done >= self.known[rid]:
                self.known[rid] += 1
                sampled.append([TOKEN])
            else:
                sampled.append([])  # a prefill chunk short of the prompt's end samples nothing
        for rid in scheduler_output.finished_req_ids:
            self.known.pop(rid, None)
        if not ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        self.pending = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)}, sampled_token_ids=sampled
        )
        self.busy_until = max(time.monotonic(), self.busy_until) + STEP_SECONDS
        return None

    def sample_tokens(self, grammar_output) -> _Output:
        output, self.pending = self.pending, None
        return _Output(output, self.busy_until)

    def take_draft_token_ids(self) -> None:
        return None

    def reset_mm_cache(self) -> None:
        return None

    def reset_encoder_cache(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def _keep_async_scheduling() -> None:
    """vLLM's CPU platform turns async scheduling off ("not required on CPU"); GPU platforms keep it, and vLLM
    turns it on by default there. Keep the flag as the command line set it, so ``--async-scheduling`` runs
    vLLM's async engine loop (batch queue of two) here as it does on a GPU. vLLM resolves the executor class,
    importing this module, before it applies the platform's settings."""
    from vllm.platforms.cpu import CpuPlatform

    platform_update = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        wanted = vllm_config.scheduler_config.async_scheduling
        platform_update(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = wanted

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


_keep_async_scheduling()


class StandInExecutor(UniProcExecutor):
    """vLLM's single-process executor with the stand-in worker (see the module docstring)."""

    def _init_executor(self) -> None:
        self.driver_worker = _Worker(self.vllm_config)
