"""The Ray Serve application: N ``NodeReplica``s (one simulated node each) behind an OpenAI-compatible
ingress whose deployment handle routes with ``PABRequestRouter`` (PAB, PAB + prefix affinity or prefix affinity;
or Ray's default power-of-two router).

Every request ends one way, counted by the ingress under a bounded set of keys (``GET
/v1/fairbatching/stats``): finished; bad request (400/408/413, before it reaches a replica); refused (429 with
Retry-After: the router's admission control or the node's; 503 while shutting down); cancelled (its client
went away); failed (its replica died after its stream began: an error event, or 502 when not streaming; or
the drain ran out). A request whose replica died before its first token is sent again (re-routed), never
lost or served twice.

No ``from __future__ import annotations`` here: FastAPI reads the route annotations (``request: Request``)
at import, and a string annotation it cannot resolve makes every call a 422.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from fairbatching.core.modes import Admission, parse_mode
from fairbatching.core.request import SLO
from fairbatching.costmodel.profile import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.ray_serve.node_server import NodeOptions, NodeServer, scaled
from fairbatching.integrations.ray_serve.protocol import (
    BadRequest,
    ByteTokenizer,
    CompletionRequest,
    Limits,
    RequestChecker,
    completion_chunk,
    error_body,
    sse,
    usage,
)
from fairbatching.integrations.ray_serve.routing import RoutingRefused

ROUTERS = ("pab", "pab-affinity", "prefix-affinity", "default")
BUDGET_ROUTERS = ("pab", "pab-affinity")  # the routers that see budgets, so can refuse
MAX_ATTEMPTS = 4  # sends of one request whose replicas keep dying before its first token
_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer (nobody reads it)
SHUTDOWN_WAIT_LOOP_S = 0.2  # how often a stopping replica checks it has nothing left (Ray's default: 2 s)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    replicas: int = 2
    node: NodeOptions = field(default_factory=NodeOptions)
    router: str = "pab"
    admission: Admission | None = None  # the router's (budget routers only); default: reject with them, else none
    report_interval: float = 0.5
    report_delay: float = 0.2
    model_name: str = "fairbatching-sim"
    max_ongoing_requests: int = 1024  # per replica: the node's own scheduler queues, as vLLM's does
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        default = Admission.REJECT if self.router in BUDGET_ROUTERS else Admission.NONE
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission or default, "admission"))
        if self.router not in BUDGET_ROUTERS and self.admission != "none":
            raise ConfigError("router admission control needs --router pab or pab-affinity (they see budgets)")
        if self.report_interval <= 0 or self.report_delay < 0:
            raise ConfigError("report_interval must be positive and report_delay non-negative")
        slo = self.node.slo
        if max(slo.ttft, slo.tpot) > self.limits.max_slo_s:
            raise ConfigError(
                f"the default SLO ({slo.ttft:g} s, {slo.tpot:g} s) is above --max-slo {self.limits.max_slo_s:g}"
            )

    def checker(self) -> RequestChecker:
        """The request checker for this server's model, context and node profile (scaled like the nodes); with
        prefix caching it hashes each prompt in the nodes' KV blocks."""
        prof = load_profile(self.node.profile)
        cost = scaled(prof.cost_model(), self.node.time_scale)
        block_size = prof.kv.block_size if self.node.prefix_caching else 0
        node = self.node
        return RequestChecker(self.model_name, node.max_model_len, node.slo, cost, self.limits, None, block_size)


@serve.deployment
class NodeReplica:
    """One serving node (step loop + policy + simulated executor) that reports its PAB to the router."""

    def __init__(self, options: NodeOptions) -> None:
        self.server = NodeServer(options, serve.get_replica_context().replica_id.unique_id)

    async def generate(self, job: dict) -> AsyncIterator[tuple]:
        slo = SLO(job["ttft"], job["tpot"])
        blocks = tuple(job.get("blocks", ()))
        events = self.server.generate(job["id"], job["arrival"], job["prompt_tokens"], job["max_tokens"], slo, blocks)
        async for e in events:
            yield (e.count, e.finished, e.status, e.reason)

    def record_routing_stats(self) -> dict:
        return self.server.report()


async def _chain(first: tuple, rest) -> AsyncIterator[tuple]:
    yield first
    if not first[1]:
        async for item in rest:
            yield item


class _BodyRefused(Exception):
    """A body over the size limit (413) or too slow to arrive (408)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Stopped(Exception):
    """The server shut down (drain timeout) before this request finished."""


api = FastAPI(title="fairbatching")


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, nodes: DeploymentHandle, config: ServeConfig) -> None:
        self.nodes = nodes.options(stream=True)
        self.config = config
        self.checker = config.checker()
        self.tokenizer = ByteTokenizer()
        self.counts: Counter[str] = Counter()
        self.draining = False  # set by drain(): new requests get 503
        self.stopping = False  # set when the drain ran out: what is left is cancelled and fails
        self.inflight: dict[str, Any] = {}  # request id -> its replica call (None while reading its body)
        self.idle = asyncio.Event()
        self.idle.set()

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.config.model_name, "object": "model", "owned_by": "fairbatching"}],
        }

    @api.get("/v1/fairbatching/stats")
    async def stats(self) -> dict:
        """Every request's outcome so far, by kind and reason (a bounded set of keys)."""
        return dict(self.counts)

    @api.get("/v1/fairbatching/inflight")
    async def in_flight(self) -> dict:
        """How many requests the ingress holds now: reading their bodies, waiting for a replica or streaming."""
        return {"in_flight": len(self.inflight)}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        if self.draining:
            return self._error("refused: shutting down", "the server is shutting down", "unavailable", 503, "1")
        rid = f"cmpl-{uuid.uuid4().hex}"
        self._begin(rid)
        streaming = False
        try:
            response = await self._complete(rid, time.time(), request)
            streaming = isinstance(response, StreamingResponse)
            return response
        except asyncio.CancelledError:
            self.counts["cancelled: client disconnected"] += 1
            raise
        except (ClientDisconnect, TaskCancelledError):  # gone while its body was read, or Ray cancelled its call
            self.counts["cancelled: client disconnected"] += 1
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception:
            logger.exception("request %s failed", rid)
            return self._error("failed: internal error", f"request {rid}: internal error", "internal_error", 500)
        finally:
            if not streaming:
                self._end(rid)

    async def drain(self, timeout_s: float) -> dict:
        """Stop taking requests (503), let those in flight finish for up to ``timeout_s``, then cancel the rest,
        which end with an error naming the shutdown. Returns how many were in flight and how many were cut."""
        self.draining = True
        in_flight = len(self.inflight)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        cut = len(self.inflight)
        if cut:
            self.stopping = True
            for call in list(self.inflight.values()):
                if call is not None:
                    call.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), 5.0)
        return {"in_flight": in_flight, "cut": cut}

    def _begin(self, rid: str) -> None:
        self.inflight[rid] = None
        self.idle.clear()

    def _end(self, rid: str) -> None:
        self.inflight.pop(rid, None)
        if not self.inflight:
            self.idle.set()

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused early when it is over the limit or arrives too slowly."""
        limit, timeout = self.config.limits.max_body_bytes, self.config.limits.body_timeout_s
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyRefused(413, f"the request body ({int(declared)} bytes) is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BodyRefused(413, f"the request body is over the limit of {limit} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise _BodyRefused(408, f"the request body did not arrive within {timeout:g} s") from None
        return b"".join(chunks)

    async def _complete(self, rid: str, arrival: float, request: Request) -> Response:
        try:
            req = self.checker.parse_bytes(await self._read_body(request))
        except BadRequest as exc:
            return self._error("bad request", str(exc), "invalid_request_error", 400)
        except _BodyRefused as exc:
            key = "bad request: body too large" if exc.code == 413 else "bad request: body read timed out"
            return self._error(key, exc.message, "invalid_request_error", exc.code)
        if self.stopping:
            msg = f"request {rid}: the server shut down before it was sent"
            return self._error("failed: shut down before it finished", msg, "unavailable", 503)
        job = {
            "id": rid,
            "arrival": arrival,
            "prompt_tokens": req.prompt_tokens,
            "max_tokens": req.max_tokens,
            "ttft": req.slo.ttft,
            "tpot": req.slo.tpot,
            "blocks": req.block_hashes,  # with prefix caching: the router's affinity and the node's lookup
        }
        try:
            gen, first = await self._start(job)
        except RoutingRefused as exc:
            return self._refused(exc.reason, exc.retry_after_header)
        except _REPLICA_GONE as exc:
            msg = f"request {rid}: {MAX_ATTEMPTS} replicas died before its first token ({type(exc).__name__})"
            return self._error("failed: no replica answered", msg, "replica_failed", 503)
        except _Stopped:
            msg = f"request {rid}: the server shut down before its first token"
            return self._error("failed: shut down before it finished", msg, "unavailable", 503)
        count, finished, status, reason = first
        if finished and count == 0 and status == "rejected":
            return self._error("refused: node admission control", f"refused: node {reason}", "overloaded", 429, "1")
        events = _chain(first, gen)
        if req.stream:
            return StreamingResponse(self._sse(rid, req, events), media_type="text/event-stream")
        return await self._whole(rid, req, events)

    async def _start(self, job: dict) -> tuple:
        """Send ``job`` and wait for its first event; a replica that dies first gets it re-routed."""
        for attempt in range(MAX_ATTEMPTS):
            gen = self.inflight[job["id"]] = self.nodes.generate.remote(job)
            try:
                return gen, await gen.__anext__()
            except RequestCancelledError:
                if self.stopping:
                    raise _Stopped() from None
                raise
            except _REPLICA_GONE:
                self.counts["rerouted: replica died before the first token"] += 1
                if attempt == MAX_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _sse(self, rid: str, req: CompletionRequest, events: AsyncIterator[tuple]) -> AsyncIterator[str]:
        model, produced, counted = req.model, 0, False
        try:
            end, error = None, None
            try:
                async for count, finished, status, reason in events:
                    if count:
                        text = "".join(self.tokenizer.token_text(produced + i) for i in range(count))
                        produced += count
                        yield sse(completion_chunk(rid, model, text, None))
                    if finished:
                        end = (status, reason)
                        break
            except (*_REPLICA_GONE, RequestCancelledError) as exc:
                error = exc
            failure = self._failure(rid, produced, end, error)
            counted = True
            if failure is not None:
                key, message, kind, code = failure
                self.counts[key] += 1
                yield sse(error_body(message, kind, code))
                yield sse("[DONE]")
                return
            self.counts["finished"] += 1
            yield sse(completion_chunk(rid, model, "", "length"))
            if req.include_usage:
                chunk = {
                    **completion_chunk(rid, model, "", None),
                    "choices": [],
                    "usage": usage(req.prompt_tokens, produced),
                }
                yield sse(chunk)
            yield sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            if not counted:
                self.counts["cancelled: client disconnected"] += 1
            raise
        finally:
            self._end(rid)

    async def _whole(self, rid: str, req: CompletionRequest, events: AsyncIterator[tuple]) -> JSONResponse:
        produced, end, error = 0, None, None
        try:
            async for count, finished, status, reason in events:
                produced += count
                if finished:
                    end = (status, reason)
        except (*_REPLICA_GONE, RequestCancelledError) as exc:
            error = exc
        failure = self._failure(rid, produced, end, error)
        if failure is not None:
            return self._error(*failure)
        self.counts["finished"] += 1
        text = "".join(self.tokenizer.token_text(i) for i in range(produced))
        body = completion_chunk(rid, req.model, text, "length")
        return JSONResponse({**body, "usage": usage(req.prompt_tokens, produced)})

    def _failure(
        self, rid: str, produced: int, end: tuple[str, str] | None, error: Exception | None
    ) -> tuple[str, str, str, int] | None:
        """How a request's events ended: None when it finished, else its count key, message, type and code.
        A stream that stops without its last event never counts as finished."""
        if isinstance(error, _REPLICA_GONE):
            msg = f"request {rid}: its replica died after {produced} tokens ({type(error).__name__})"
            return "failed: replica died mid-stream", msg, "replica_failed", 502
        if end is not None:
            if end[0] == "finished":
                return None
            return f"failed: node ended it {end[0]}", f"request {rid} ended {end[0]}: {end[1]}", "request_failed", 500
        if self.stopping:
            msg = f"request {rid}: the server shut down after {produced} tokens (drain timeout)"
            return "failed: shut down before it finished", msg, "unavailable", 503
        if error is not None:  # cancelled, and not by the drain: its client went away
            return "cancelled: client disconnected", f"request {rid}: cancelled", "cancelled", 499
        return "failed: stream ended without a status", f"request {rid}: its stream ended early", "request_failed", 500

    def _error(self, key: str, message: str, kind: str, code: int, retry_after: str | None = None) -> JSONResponse:
        self.counts[key] += 1
        headers = {"Retry-After": retry_after} if retry_after else None
        return JSONResponse(error_body(message, kind, code), status_code=code, headers=headers)

    def _refused(self, reason: str, retry_after: str) -> JSONResponse:
        """The router refused it: by admission control, its only refusal."""
        return self._error("refused: router admission control", f"refused: {reason}", "overloaded", 429, retry_after)


def build_app(config: ServeConfig):
    """The application: ``config.replicas`` node replicas behind one ingress."""
    if config.router != "default":
        kv = load_profile(config.node.profile).kv  # a prefix index holds as many blocks as a node's cache
        router = RequestRouterConfig(
            request_router_class="fairbatching.integrations.ray_serve.router:PABRequestRouter",
            request_router_kwargs={
                "router": config.router,
                "kv_blocks": kv.num_blocks,
                "block_size": kv.block_size,
                "admission": config.admission,
                "report_interval": config.report_interval,
                "report_delay": config.report_delay,
            },
            request_routing_stats_period_s=config.report_interval,
            request_routing_stats_timeout_s=max(1.0, 4 * config.report_interval),
        )
    else:
        router = RequestRouterConfig(request_routing_stats_period_s=config.report_interval)
    nodes = NodeReplica.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        request_router_config=router,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
        ray_actor_options={"num_cpus": 0},
    ).bind(config.node)
    return OpenAIIngress.options(
        max_ongoing_requests=100_000,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
        ray_actor_options={"num_cpus": 0},
    ).bind(nodes, config)
