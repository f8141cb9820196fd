"""One serving node in real time: our step loop (``serving.Node``) and a policy, with a simulated executor.

Each step the policy plans a batch, the profile's cost model prices it, and the loop sleeps until the step's
tokens are due, then hands them to the requests' streams. Requests that arrive meanwhile join the queue
before the next plan, exactly as in the simulator. ``time_scale`` multiplies every step's price (and the
policy's model with it, so plans stay consistent): 0.25 runs an H100 profile four times faster, for tests.
Runs on one asyncio loop, no threads: the Ray replica and the tests drive the same object.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace

from fairbatching.core.modes import DEFAULT_SLO
from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.costmodel.model import CostModel
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.policies import make_policy
from fairbatching.serving.node import Node, NodeConfig

IDLE_POLL_S = 0.05  # an idle node with deferred requests re-checks them this often (scaled)


@dataclass(frozen=True)
class NodeOptions:
    policy: str = "fairbatching"
    profile: str | None = None
    slo: SLO = DEFAULT_SLO
    time_scale: float = 1.0
    admission: str = "none"  # node-side FairBatching-PAB admission: none, reject or defer
    max_model_len: int = 131072
    policy_options: tuple[tuple[str, object], ...] = ()
    prefix_caching: bool = False  # the node caches prefixes by the block hashes each request carries

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ConfigError(f"time_scale must be positive, got {self.time_scale!r}")


def scaled(cost: CostModel, factor: float) -> CostModel:
    """The same model with every time coefficient times ``factor``: each prediction scales by ``factor``."""
    p = cost.params
    return CostModel(
        replace(
            p,
            t_fixed=p.t_fixed * factor,
            c_seq=p.c_seq * factor,
            t_weights=p.t_weights * factor,
            c_kv=p.c_kv * factor,
            c_tok=p.c_tok * factor,
            c_attn=p.c_attn * factor,
            t_mixed=p.t_mixed * factor,
        )
    )


@dataclass(frozen=True)
class TokenEvent:
    """Tokens of one request out of one step (``count`` of them, at wall time ``time``), or its end."""

    count: int
    time: float
    finished: bool = False
    status: str = ""
    reason: str = ""


class _Stream:
    __slots__ = ("request", "queue", "sent")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.sent = 0


_ENDED = (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.TIMED_OUT, RequestStatus.FAILED)


class NodeServer:
    """A node serving requests in real time. ``generate`` streams a request's tokens; ``report`` is what
    the node tells a router (its load and Prefill Admission Budget)."""

    def __init__(self, options: NodeOptions, name: str = "node") -> None:
        prof = load_profile(options.profile)
        cost = scaled(prof.cost_model(), options.time_scale)
        policy = make_policy(options.policy, cost, tpot_slo=options.slo.tpot, **dict(options.policy_options))
        config = NodeConfig(
            options.slo,
            prof.kv,
            max_model_len=options.max_model_len,
            record_iterations=False,
            fast_forward=False,  # tokens are handed out step by step
            admission=options.admission,
            prefix_caching=options.prefix_caching,
        )
        self.options = options
        self.node = Node(policy, cost, config, name)
        self.epoch = time.time()
        self._streams: dict[str, _Stream] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    def now(self) -> float:
        """The node's clock: wall seconds since this server started."""
        return time.time() - self.epoch

    async def generate(
        self,
        request_id: str,
        arrival_wall: float,
        prompt_tokens: int,
        max_tokens: int,
        slo: SLO | None,
        block_hashes: tuple[int, ...] = (),
    ) -> AsyncIterator[TokenEvent]:
        """Queue a request (arrival in wall-clock seconds, ``time.time()``) and yield its tokens as the
        steps produce them; the last event says how it ended. Cancelling the iterator aborts it.
        ``block_hashes``: its prompt's, looked up in the prefix cache (when the node has one)."""
        node = self.node
        if request_id in self._streams or request_id in node.targets:
            raise ConfigError(f"request id {request_id!r} submitted twice")
        self._start()
        arrival = min(arrival_wall - self.epoch, self.now())
        r = node.new_request(request_id, arrival, prompt_tokens, slo, block_hashes)
        stream = self._streams[request_id] = _Stream(r)
        node.submit(r, max_tokens)
        self._emit(stream)
        self._wake.set()
        try:
            while True:
                event = await stream.queue.get()
                yield event
                if event.finished:
                    return
        finally:
            if r.status not in _ENDED:
                self._abort(r, "cancelled by the client")
            self._streams.pop(request_id, None)
            node.targets.pop(request_id, None)

    def report(self) -> dict:
        """Load and Prefill Admission Budget (horizon: the default TTFT), stamped with the wall clock; also how
        many requests have had no token yet (``unstarted``) and how many are streaming theirs."""
        node = self.node
        node.state.now = max(node.clock, self.now())
        budget = node.policy.admission_budget(node.state, self.options.slo.ttft)
        queued = sum(r.num_tokens - r.num_computed for r in node.running + node.waiting if not r.is_decode)
        unstarted = sum(1 for s in self._streams.values() if s.sent == 0)
        return {
            "time": time.time(),
            "outstanding": len(node.running) + len(node.waiting) + len(node.deferred),
            "unstarted": unstarted,
            "streaming": len(self._streams) - unstarted,
            "queued_tokens": queued,
            "kv_used_tokens": node.kv.used_blocks * node.kv.block_size,
            "budget": asdict(budget),
        }

    def _start(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        node = self.node
        idle_poll = IDLE_POLL_S * self.options.time_scale
        while True:
            if not node.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            node.clock = max(node.clock, self.now())
            progressed = node.step(horizon=float("inf"))
            # A step's tokens are stamped at its end (node.clock, in the future): hand them out then.
            delay = node.clock - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            self._emit_all()
            if not progressed:
                # Nothing schedulable (deferred admission, KV full): only an arrival or time changes that.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), idle_poll)

    def _emit_all(self) -> None:
        for stream in list(self._streams.values()):
            self._emit(stream)
        self.node.done.clear()  # the streams hold what they need; a long-running node keeps no history

    def _emit(self, stream: _Stream) -> None:
        r = stream.request
        n = len(r.token_times)
        if n > stream.sent:
            stream.queue.put_nowait(TokenEvent(n - stream.sent, r.token_times[-1] + self.epoch))
            stream.sent = n
        if r.status in _ENDED and self._streams.pop(r.request_id, None) is not None:
            stream.queue.put_nowait(TokenEvent(0, time.time(), True, r.status.value, r.finish_reason or ""))

    def _abort(self, r: Request, reason: str) -> None:
        """End ``r`` where it stands (its client went away): free its KV, drop it from every queue."""
        node = self.node
        for queue in (node.running, node.waiting, node.deferred):
            if r in queue:
                queue.remove(r)
        node.kv.free(r)
        r.status, r.finish_reason = RequestStatus.FAILED, reason
