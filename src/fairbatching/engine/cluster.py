"""A cluster of engine replicas on the wall clock: one process per device, each running the same step loop
and policy as a single-node replay, behind one router process that reads only the reports replicas publish.

The router is the cluster simulator's (``cluster.dispatch``: same reports, same report aging, same routing
and admission rules, and with prefix caching the same prompt block hashes shown to the router), so a
configuration run here and in ``simulate_cluster`` differs only in what executes the steps. Replicas are
kept across replays (an engine is built once per device). This is the package's own multi-process driver,
not Ray: it exists so a cluster can be measured where Ray cannot be installed.

The same replicas also serve single-node replays side by side (``replay_each``: one ``ReplayJob`` per
replica at a time), which is how the run layer's GPU backend spreads a compare or a capacity search over
the visible GPUs.
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from fairbatching.cluster.dispatch import ended_request, node_report, route
from fairbatching.cluster.routers import NodeReport
from fairbatching.cluster.simulator import ClusterConfig, ClusterResult
from fairbatching.core.backend import EngineSpec
from fairbatching.core.modes import Admission
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.policies import make_policy
from fairbatching.serving.simulator import NodeResult
from fairbatching.workloads.spec import RequestSpec, Workload

__all__ = ["EngineCluster", "EngineSpec", "ReplayJob", "ReplicaError", "replica_devices"]

START_DELAY = 0.2  # seconds between "go" and the first arrival, so every replica's first report is in
PROGRESS_EVERY = 0.5  # seconds between a single-node replay's progress messages


def replica_devices(replicas: int, device: str | None) -> list[str | None]:
    """One ``CUDA_VISIBLE_DEVICES`` value per replica (GPUs 0..N-1), or None each for CPU engines."""
    import torch

    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return [None] * replicas
    if replicas > torch.cuda.device_count():
        raise ConfigError(f"{replicas} replicas need {replicas} GPUs; this machine has {torch.cuda.device_count()}")
    return [str(i) for i in range(replicas)]


@dataclass(frozen=True)
class ReplayJob:
    """One single-node replay on one replica (``engine.loop.replay``'s arguments, picklable): ``policy`` with
    ``options`` plans with ``profile`` (a name, a path, or a ``Profile``); ``prefix_caching``: the node caches
    prefixes, each prompt hashed from its token ids."""

    workload: Workload
    policy: str
    profile: Any
    slo: SLO
    options: tuple[tuple[str, Any], ...] = ()
    admission: Admission = Admission.NONE
    queue_timeout: float | None = None
    seed: int = 0
    prefix_caching: bool = False


class ReplicaError(RuntimeError):
    """A replica process failed; the message carries its traceback."""


class EngineCluster:
    """``len(devices)`` replica processes, each pinned to one device (``CUDA_VISIBLE_DEVICES``; None for a
    CPU engine). Use as a context manager; ``replay`` runs one workload through all of them."""

    def __init__(self, engine: EngineSpec, devices: list[str | None]) -> None:
        if not devices:
            raise ConfigError("an engine cluster needs at least one device")
        ctx = mp.get_context("spawn")
        self.outbox: Any = ctx.Queue()
        self.inboxes: list[Any] = [ctx.Queue() for _ in devices]
        self.procs = [
            ctx.Process(target=_replica_main, args=(i, d, engine, self.inboxes[i], self.outbox), daemon=True)
            for i, d in enumerate(devices)
        ]
        with _sigint_blocked():  # the replicas inherit the blocked signal from birth: a Ctrl-C is the parent's
            for p in self.procs:
                p.start()
        try:
            ready = self._gather("ready")
        except BaseException:  # Ctrl-C or a replica failing while the engines build: stop every replica now
            self.close(abort=True)
            raise
        self.kv_blocks = [int(msg[2]) for msg in ready]
        self.graphs: list[dict[str, int]] = [msg[3] for msg in ready]  # captured at warm-up, per replica

    def __enter__(self) -> EngineCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(abort=exc_type is not None)

    def close(self, abort: bool = False) -> None:
        """Stop the replicas: after their current replay, or at once (``abort``: an error or Ctrl-C)."""
        for box in self.inboxes:
            if abort:  # what a stopped replica never read must not hold this process at exit
                box.cancel_join_thread()
            else:
                box.put(("stop",))
        for p in self.procs:
            p.join(timeout=0 if abort else 10)
            if p.is_alive():
                p.terminate()
                p.join()

    def _gather(self, kind: str) -> list[tuple]:
        """One ``kind`` message from every replica (reports arriving meanwhile are dropped)."""
        got: dict[int, tuple] = {}
        while len(got) < len(self.procs):
            try:
                msg = self.receive(timeout=1.0)
            except queue.Empty:
                continue
            if msg[0] == kind:
                got[msg[1]] = msg
        return [got[i] for i in range(len(self.procs))]

    def receive(self, timeout: float) -> tuple:
        """The next replica message; a replica that reported an error, or died without one, raises."""
        try:
            msg = self.outbox.get(timeout=timeout) if timeout > 0 else self.outbox.get_nowait()
        except queue.Empty:
            for i, p in enumerate(self.procs):
                if not p.is_alive():
                    raise ReplicaError(f"replica {i} exited (code {p.exitcode}) without a word") from None
            raise
        if msg[0] == "error":
            raise ReplicaError(f"replica {msg[1]} failed:\n{msg[2]}")
        return msg

    def replay(
        self,
        workload: Workload,
        config: ClusterConfig,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> ClusterResult:
        """Replay ``workload`` on the wall clock: each request is routed at its trace time (relative to the
        first) and its TTFT counts from then, so routing, holds and transfer are part of it."""
        if len(config.nodes) != len(self.procs):
            raise ConfigError(f"the config names {len(config.nodes)} nodes, this cluster has {len(self.procs)}")
        specs = sorted(workload.requests, key=lambda s: s.arrival)
        base = specs[0].arrival if specs else 0.0
        specs = [replace(s, arrival=s.arrival - base) for s in specs]  # content segments kept: prompts share them
        with_budget = config.make_router().needs_budget
        for i, box in enumerate(self.inboxes):
            node = config.nodes[i]
            run = (
                node.policy,
                node.profile,
                config.slo,
                config.report_interval,
                with_budget,
                config.prefix_caching,
                config.admission,
            )
            box.put(("run", *run, specs, seed))
        self._gather("prepared")
        t0 = time.monotonic() + START_DELAY
        for box in self.inboxes:
            box.put(("go", t0))
        ended = _Router(config, self, t0).run(specs, progress)
        for box in self.inboxes:
            box.put(("drain",))
        done = self._gather("done")
        requests = [r for msg in done for r in msg[2]["requests"]] + ended
        per_node = [msg[2]["node"] for msg in done]
        return ClusterResult(
            requests,
            max((n["end_s"] for n in per_node), default=0.0),
            sum(n["busy_s"] for n in per_node),
            sum(n["preemptions"] for n in per_node),
            per_node,
        )

    def replay_each(
        self,
        jobs: list[ReplayJob],
        progress: Callable[[int, int, int], None] | None = None,
        on_result: Callable[[int, NodeResult], None] | None = None,
    ) -> list[NodeResult]:
        """Each job replayed alone on one replica, as many at once as there are replicas; results in ``jobs``'
        order. ``progress(job, ended, total)`` follows each job's requests, ``on_result(job, result)`` hears
        each job as it ends (before the others have)."""
        results: dict[int, NodeResult] = {}
        todo = list(range(len(jobs)))
        idle = list(range(len(self.procs)))
        busy: dict[int, int] = {}  # replica -> the job it replays
        while todo or busy:
            while todo and idle:
                replica, job = idle.pop(0), todo.pop(0)
                busy[replica] = job
                self.inboxes[replica].put(("replay", jobs[job]))
            try:
                msg = self.receive(timeout=1.0)
            except queue.Empty:
                continue
            if msg[0] == "progress" and msg[1] in busy:
                if progress is not None:
                    progress(busy[msg[1]], msg[2], len(jobs[busy[msg[1]]].workload))
            elif msg[0] == "replayed":
                job = busy.pop(msg[1])
                idle.append(msg[1])
                results[job] = msg[2]
                if on_result is not None:
                    on_result(job, msg[2])
        return [results[i] for i in range(len(jobs))]


class _Router:
    """The router process's loop: wait for each arrival, read the latest reports, route, send."""

    def __init__(self, config: ClusterConfig, cluster: EngineCluster, t0: float) -> None:
        self.cfg = config
        self.cluster = cluster
        self.t0 = t0
        self.router = config.make_router()
        self.latest: dict[int, NodeReport] = {}
        # With prefix caching the router sees each prompt's block hashes as the simulator's router does (from
        # its content segments, at the profile's block size: ``PrefixIndex`` counts matches in those blocks).
        self.block_size = load_profile(config.nodes[0].profile).kv.block_size if config.prefix_caching else 0

    def blocks(self, spec: RequestSpec) -> tuple[int, ...]:
        """The hashes of ``spec``'s full prompt blocks the router is shown (none without prefix caching)."""
        if not self.block_size:
            return ()
        return spec.block_hashes(self.block_size)[: spec.prompt_len // self.block_size]

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def take_reports(self, until: float) -> None:
        """Read replica reports until the clock reaches ``until`` (at least once, without waiting)."""
        while True:
            wait = until - self.clock()
            try:
                msg = self.cluster.receive(timeout=wait)
            except queue.Empty:
                return
            if msg[0] == "report":
                self.latest[msg[1]] = msg[2]

    def run(self, specs: list[RequestSpec], progress: Callable[[int, int], None] | None) -> list[Request]:
        pending = [(s.arrival, i, s) for i, s in enumerate(specs)]
        heapq.heapify(pending)
        seq = len(pending)
        ended: list[Request] = []
        routed = 0
        while pending:
            t, _, spec = heapq.heappop(pending)
            self.take_reports(t)
            now = max(t, self.clock())
            aging = self.cfg.aging
            views = [v for r in self.latest.values() if (v := aging.read(r, now)) is not None]
            slo = spec.slo or self.cfg.slo
            decision = route(
                self.router,
                sorted(views, key=lambda v: v.node),
                spec.prompt_len,
                spec.arrival,
                slo.ttft,
                now,
                self.cfg.admission,
                self.cfg.report_interval,
                self.blocks(spec),
            )
            if decision.retry_at is not None:
                seq += 1
                heapq.heappush(pending, (decision.retry_at, seq, spec))
                continue
            if decision.refusal is not None:
                ended.append(ended_request(spec, self.cfg.slo, RequestStatus.REJECTED, decision.refusal))
            else:
                self.cluster.inboxes[decision.node].put(("submit", spec.request_id))
            routed += 1
            if progress is not None:
                progress(routed, len(specs))
        return ended


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile: processes started here keep it blocked (fork and exec keep the
    signal mask), and one that arrives meanwhile is delivered here on the way out, not lost."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _replica_main(index: int, device: str | None, engine: EngineSpec, inbox: Any, outbox: Any) -> None:
    """A replica process: build the engine on its device, then serve replays until told to stop. SIGINT stays
    blocked here (``_sigint_blocked``): a Ctrl-C reaches the whole process group, and the parent, which hears
    it, stops the replicas."""
    try:
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        from fairbatching.engine import build_engine

        runner = build_engine(
            engine.model,
            device=engine.device,
            num_blocks=engine.num_blocks,
            block_size=engine.block_size,
            max_context=engine.max_context,
            kv_memory_fraction=engine.kv_memory_fraction,
        )
        runner.warmup()
        outbox.put(("ready", index, runner.pool.usable, runner.graph_counts))
        while (msg := inbox.get())[0] in ("run", "replay"):
            if msg[0] == "run":
                outbox.put(("done", index, _serve_replay(index, runner, msg[1:], inbox, outbox)))
            else:
                outbox.put(("replayed", index, _replay_alone(index, runner, msg[1], outbox)))
    except BaseException:
        outbox.put(("error", index, traceback.format_exc()))


def _replay_alone(index: int, runner: Any, job: ReplayJob, outbox: Any) -> NodeResult:
    """One single-node replay on this replica (the router is not involved); progress goes out twice a second."""
    from fairbatching.engine.loop import replay

    prof = job.profile if not isinstance(job.profile, str) else load_profile(job.profile)
    cost = prof.cost_model()
    policy = make_policy(job.policy, cost, tpot_slo=job.slo.tpot, **dict(job.options))
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if done == total or time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            outbox.put(("progress", index, done))

    return replay(
        runner,
        policy,
        cost,
        job.workload,
        job.slo,
        job.seed,
        job.queue_timeout,
        progress,
        admission=job.admission,
        prefix_caching=job.prefix_caching,
    )


def _serve_replay(index: int, runner: Any, run: tuple, inbox: Any, outbox: Any) -> dict:
    """One replay on this replica: requests come from the router, reports go out every interval."""
    from fairbatching.engine.loop import draw_prompts, serving_node

    policy_name, profile_name, slo, interval, with_budget, caching, admission, specs, seed = run
    cost = load_profile(profile_name).cost_model()
    policy = make_policy(policy_name, cost, tpot_slo=slo.tpot)
    # Every replica draws every prompt the same way, before the clock starts (clients send token ids).
    prompts = draw_prompts(specs, runner.model.config.vocab_size, seed)
    by_id = {s.request_id: (s, p) for s, p in zip(specs, prompts, strict=True)}
    outbox.put(("prepared", index))
    t0 = _expect(inbox, "go")[1]

    def clock() -> float:
        return time.monotonic() - t0

    node, executor = serving_node(runner, policy, cost, slo, clock, admission=admission, prefix_caching=caching)
    next_report = clock()
    draining = False
    while True:
        now = clock()
        if now >= next_report:
            outbox.put(("report", index, node_report(node, index, now, slo.ttft, with_budget)))
            next_report = max(next_report + interval, now)
        timeout = 0.0 if node.has_work else max(0.0, next_report - clock())
        for msg in _messages(inbox, timeout if not draining else 0.0):
            if msg[0] == "drain":
                draining = True
                continue
            if msg[0] != "submit":
                raise RuntimeError(f"replica got {msg[0]!r} in the middle of a replay")
            _submit(node, executor, *by_id[msg[1]], caching)
        node.clock = clock()
        if node.has_work:
            node.step(horizon=float("inf"))
        elif draining:
            break
    executor.sync_blocks()
    summary = {
        "node": f"n{index}",
        "policy": policy.name,
        "finished": len(node.done),
        "iterations": node.iterations,
        "busy_s": node.busy,
        "preemptions": node.preemptions,
        "end_s": node.clock,
    }
    return {"requests": node.done, "node": summary}


def _submit(node: Any, executor: Any, spec: RequestSpec, prompt: list[int], caching: bool) -> None:
    """Start a routed request on this replica (with prefix caching, its prompt hashed from its token ids)."""
    executor.add_prompt(spec.request_id, prompt)
    hashes = executor.block_hashes(spec.request_id) if caching else ()
    node.submit(node.new_request(spec.request_id, spec.arrival, spec.prompt_len, spec.slo, hashes), spec.output_len)


def _messages(inbox: Any, timeout: float) -> list[tuple]:
    """What the router has sent: everything queued now, or (``timeout`` > 0) the first thing within it."""
    out = []
    try:
        out.append(inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait())
        while True:
            out.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return out


def _expect(inbox: Any, kind: str) -> tuple:
    msg = inbox.get()
    if msg[0] != kind:
        raise RuntimeError(f"replica expected {kind!r}, got {msg[0]!r}")
    return msg
