"""The engine's step loop: the same ``serving.Node`` and policy objects as the simulator, with the model run
for real. ``generate`` runs prompts offline; ``replay`` replays a workload on the wall clock (arrivals at
their trace times, every token stamped when its iteration returns) and yields the simulator's result type,
so the same metrics module reports both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from fairbatching.core.kv import KVCacheConfig
from fairbatching.core.plan import BatchPlan
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.model import CostModel
from fairbatching.engine.runner import ModelRunner, SeqChunk
from fairbatching.errors import ConfigError
from fairbatching.policies.base import Policy
from fairbatching.serving.node import Node, NodeConfig, ProgressFn
from fairbatching.serving.simulator import NodeResult, node_result
from fairbatching.workloads.spec import RequestSpec, Workload

OFFLINE_SLO = SLO(10.0, 1.0)  # offline generation has no latency target; deadlines only order the work
TERMINAL = (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.TIMED_OUT, RequestStatus.FAILED)


class EngineExecutor:
    """A ``Node`` executor: maps the plan's requests to token ids and physical KV blocks and runs the model.

    The node's ``BlockAllocator`` decides how many blocks each request holds (as in the simulator); this
    keeps the physical ids in step with those counts, taking blocks when a count grows and giving them back
    when it drops (finish, preemption, rejection).
    """

    def __init__(self, runner: ModelRunner, clock: Callable[[], float]) -> None:
        self.runner = runner
        self.clock = clock
        self.token_ids: dict[str, list[int]] = {}
        self._blocks: dict[str, list[int]] = {}
        self._live: dict[str, Request] = {}
        # Every executed step as a profile row (new, context, seqs, attn work, seconds from plan to tokens):
        # the cost model can be checked, or refitted, on what serving actually ran.
        self.steps: list[tuple[int, int, int, float, float]] = []
        # Beside each row, what the aggregates hide (simulator fidelity): when it started, how it ran, and its
        # prefill chunks (count, largest chunk, deepest prefix under a chunk).
        self.step_detail: list[tuple[float, str, int, int, int]] = []

    def add_prompt(self, request_id: str, token_ids: list[int]) -> None:
        if request_id in self.token_ids:
            raise ConfigError(f"request id {request_id!r} submitted twice")
        if not token_ids:
            raise ConfigError(f"request {request_id!r} has an empty prompt")
        self.token_ids[request_id] = list(token_ids)

    def kv_config(self) -> KVCacheConfig:
        """The node's KV accounting must see exactly the blocks this engine can hand out."""
        return KVCacheConfig(self.runner.pool.usable, self.runner.block_size)

    def __call__(self, plan: BatchPlan, start: float) -> float:
        self.sync_blocks()
        pool = self.runner.pool
        chunks = []
        for r, n in plan.items:
            rid = r.request_id
            self._live[rid] = r
            blocks = self._blocks.setdefault(rid, [])
            if len(blocks) < r.num_blocks:
                blocks.extend(pool.take(r.num_blocks - len(blocks)))
            ids = self.token_ids[rid]
            c = r.num_computed
            chunks.append(SeqChunk(ids[c : c + n], c, blocks, sample=c + n == r.num_tokens))
        for r, token in zip(plan.requests, self.runner.run(chunks), strict=True):
            if token is not None:
                self.token_ids[r.request_id].append(token)
        end = self.clock()
        self.steps.append((plan.new_tokens, plan.context_tokens, plan.num_seqs, plan.attn_work, end - start))
        prefill = [(n, r.num_computed) for r, n in plan.items if n > 1 or not r.token_times]
        self.step_detail.append(
            (
                start,
                self.runner.last_path,
                len(prefill),
                max((n for n, _ in prefill), default=0),
                max((c for _, c in prefill), default=0),
            )
        )
        return end

    def sync_blocks(self) -> None:
        """Give back the physical blocks of requests whose block count dropped (finished, preempted, ended)."""
        pool = self.runner.pool
        for rid, r in list(self._live.items()):
            blocks = self._blocks[rid]
            if r.num_blocks < len(blocks):
                pool.give_back(blocks[r.num_blocks :])
                del blocks[r.num_blocks :]
            if r.status in TERMINAL and not blocks:
                del self._live[rid]


@dataclass
class Generation:
    tokens: list[list[int]]
    iterations: int
    preemptions: int
    max_batch_tokens: int


def generate(
    runner: ModelRunner,
    policy: Policy,
    cost_model: CostModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    slo: SLO = OFFLINE_SLO,
) -> Generation:
    """Greedy continuations of ``prompts`` (exactly ``max_new_tokens`` each), batched as ``policy`` plans."""
    start = time.perf_counter()
    executor = EngineExecutor(runner, lambda: time.perf_counter() - start)
    config = NodeConfig(slo, executor.kv_config(), max_model_len=runner.max_context, fast_forward=False)
    node = Node(policy, cost_model, config, executor=executor)
    for i, prompt in enumerate(prompts):
        rid = f"prompt-{i}"
        executor.add_prompt(rid, prompt)
        node.submit(node.new_request(rid, 0.0, len(prompt), None), max_new_tokens)
    node.drain()
    executor.sync_blocks()
    failed = [r for r in node.done if r.status is not RequestStatus.FINISHED]
    if failed:
        raise ConfigError(f"{len(failed)} prompts could not run: {failed[0].request_id}: {failed[0].finish_reason}")
    return Generation(
        [executor.token_ids[f"prompt-{i}"][len(p) :] for i, p in enumerate(prompts)],
        node.iterations,
        node.preemptions,
        max(node.log.prefill_tokens[i] + node.log.decode_seqs[i] for i in range(len(node.log.start))),
    )


def draw_prompts(specs: list[RequestSpec], vocab: int, seed: int) -> list[list[int]]:
    """Random prompt token ids of each spec's length, in order: the same ids for the same specs and seed."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(s.prompt_len)] for s in specs]


def serving_node(
    runner: ModelRunner,
    policy: Policy,
    cost_model: CostModel,
    default_slo: SLO,
    clock: Callable[[], float],
    queue_timeout: float | None = None,
) -> tuple[Node, EngineExecutor]:
    """A node whose steps run on ``runner`` and are stamped by ``clock`` (serving: no fast-forward)."""
    executor = EngineExecutor(runner, clock)
    config = NodeConfig(
        default_slo,
        executor.kv_config(),
        max_model_len=runner.max_context,
        queue_timeout=queue_timeout,
        fast_forward=False,
    )
    return Node(policy, cost_model, config, executor=executor), executor


def replay(
    runner: ModelRunner,
    policy: Policy,
    cost_model: CostModel,
    workload: Workload,
    default_slo: SLO,
    seed: int = 0,
    queue_timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> NodeResult:
    """Replay ``workload`` on the wall clock: requests arrive at their trace times (random prompt tokens of
    the trace's lengths) and run to the trace's output length, as benchmark clients with ignore_eos do."""
    specs = sorted(workload.requests, key=lambda s: s.arrival)
    # Drawn before the clock starts: clients send token ids, the server's loop does not make them.
    prompts = draw_prompts(specs, runner.model.config.vocab_size, seed)
    # Kernels compiled and graphs captured before the clock too: a server warms up before it takes traffic.
    runner.warmup()
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    node, executor = serving_node(runner, policy, cost_model, default_slo, clock, queue_timeout)
    total = len(specs)
    if progress is not None:
        node.on_finish = lambda _r: progress(len(node.done), total)
    base = specs[0].arrival if specs else 0.0
    i = 0
    while i < total:
        now = clock()
        while i < total and specs[i].arrival - base <= now:
            s = specs[i]
            executor.add_prompt(s.request_id, prompts[i])
            node.submit(node.new_request(s.request_id, s.arrival - base, s.prompt_len, s.slo), s.output_len)
            i += 1
        node.clock = clock()
        if not (node.has_work and node.step(horizon=float("inf"))) and i < total:
            time.sleep(max(0.0, specs[i].arrival - base - clock()))
    node.drain()
    executor.sync_blocks()
    return node_result(node, step_rows=executor.steps, step_detail=executor.step_detail)
