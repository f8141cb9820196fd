"""The Ray Serve application: N ``NodeReplica``s (one simulated node each) behind an OpenAI-compatible
ingress whose deployment handle routes with ``PABRequestRouter`` (or Ray's default power-of-two router).

Every request ends one way, counted by the ingress with its reason (``GET /v1/fairbatching/stats``):
finished; refused (429 with Retry-After: the router's admission control, or the node's); failed (its
replica died after its stream began: the stream ends with an error event; non-streaming: 502). A request
whose replica died before its first token is sent again (re-routed), never lost or served twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from fairbatching.core.modes import Admission, parse_mode
from fairbatching.core.request import SLO
from fairbatching.errors import ConfigError
from fairbatching.integrations.ray_serve.node_server import NodeOptions, NodeServer
from fairbatching.integrations.ray_serve.protocol import (
    BadRequest,
    ByteTokenizer,
    completion_chunk,
    error_body,
    parse_completion,
    sse,
    usage,
)
from fairbatching.integrations.ray_serve.routing import RoutingRefused

ROUTERS = ("pab", "default")
MAX_ATTEMPTS = 4  # sends of one request whose replicas keep dying before its first token
_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass(frozen=True)
class ServeConfig:
    replicas: int = 2
    node: NodeOptions = field(default_factory=NodeOptions)
    router: str = "pab"
    admission: Admission = Admission.REJECT  # the router's (pab only)
    report_interval: float = 0.5
    report_delay: float = 0.2
    model_name: str = "fairbatching-sim"
    max_ongoing_requests: int = 1024  # per replica: the node's own scheduler queues, as vLLM's does

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        object.__setattr__(self, "admission", parse_mode(Admission, self.admission, "admission"))
        if self.router != "pab" and self.admission != "none":
            raise ConfigError("router admission control needs --router pab (it is the one that sees budgets)")
        if self.report_interval <= 0 or self.report_delay < 0:
            raise ConfigError("report_interval must be positive and report_delay non-negative")


@serve.deployment
class NodeReplica:
    """One serving node (step loop + policy + simulated executor) that reports its PAB to the router."""

    def __init__(self, options: NodeOptions) -> None:
        self.server = NodeServer(options, serve.get_replica_context().replica_id.unique_id)

    async def generate(self, job: dict) -> AsyncIterator[tuple]:
        slo = SLO(job["ttft"], job["tpot"])
        async for e in self.server.generate(job["id"], job["arrival"], job["prompt_tokens"], job["max_tokens"], slo):
            yield (e.count, e.finished, e.status, e.reason)

    def record_routing_stats(self) -> dict:
        return self.server.report()


async def _chain(first: tuple, rest) -> AsyncIterator[tuple]:
    yield first
    if not first[1]:
        async for item in rest:
            yield item


api = FastAPI(title="fairbatching")


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, nodes: DeploymentHandle, config: ServeConfig) -> None:
        self.nodes = nodes.options(stream=True)
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.counts: Counter[str] = Counter()

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.config.model_name, "object": "model", "owned_by": "fairbatching"}],
        }

    @api.get("/v1/fairbatching/stats")
    async def stats(self) -> dict:
        """Every request's outcome so far, by kind and reason."""
        return dict(self.counts)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        arrival = time.time()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._bad(f"the request body is not valid JSON: {exc}")
        try:
            req = parse_completion(
                body, self.config.node.slo, self.config.model_name, self.config.node.max_model_len, self.tokenizer
            )
        except BadRequest as exc:
            return self._bad(str(exc))
        rid = f"cmpl-{uuid.uuid4().hex}"
        job = {
            "id": rid,
            "arrival": arrival,
            "prompt_tokens": req.prompt_tokens,
            "max_tokens": req.max_tokens,
            "ttft": req.slo.ttft,
            "tpot": req.slo.tpot,
        }
        try:
            gen, first = await self._start(job)
        except RoutingRefused as exc:
            return self._refused(exc.reason, exc.retry_after_header)
        except _REPLICA_GONE as exc:
            self.counts["failed: no replica answered"] += 1
            msg = f"request {rid}: {MAX_ATTEMPTS} replicas died before its first token ({type(exc).__name__})"
            return JSONResponse(error_body(msg, "replica_failed", 503), status_code=503)
        count, finished, status, reason = first
        if finished and count == 0 and status == "rejected":
            return self._refused(f"node {reason}", "1")
        events = _chain(first, gen)
        if req.stream:
            return StreamingResponse(self._sse(rid, req, events), media_type="text/event-stream")
        return await self._whole(rid, req, events)

    async def _start(self, job: dict) -> tuple:
        """Send ``job`` and wait for its first event; a replica that dies first gets it re-routed."""
        for attempt in range(MAX_ATTEMPTS):
            gen = self.nodes.generate.remote(job)
            try:
                return gen, await gen.__anext__()
            except _REPLICA_GONE:
                self.counts["rerouted: replica died before the first token"] += 1
                if attempt == MAX_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _sse(self, rid: str, req, events: AsyncIterator[tuple]) -> AsyncIterator[str]:
        model, produced = req.model, 0
        try:
            async for count, finished, status, reason in events:
                if count:
                    text = "".join(self.tokenizer.token_text(produced + i) for i in range(count))
                    produced += count
                    yield sse(completion_chunk(rid, model, text, None))
                if finished:
                    if status != "finished":
                        self.counts[f"failed: {reason}"] += 1
                        yield sse(error_body(f"request {rid} ended {status}: {reason}", "request_failed", 500))
                        yield sse("[DONE]")
                        return
                    break
        except _REPLICA_GONE as exc:
            self.counts["failed: replica died mid-stream"] += 1
            msg = f"request {rid}: its replica died after {produced} tokens ({type(exc).__name__})"
            yield sse(error_body(msg, "replica_failed", 502))
            yield sse("[DONE]")
            return
        self.counts["finished"] += 1
        yield sse(completion_chunk(rid, model, "", "length"))
        if req.include_usage:
            yield sse(
                {**completion_chunk(rid, model, "", None), "choices": [], "usage": usage(req.prompt_tokens, produced)}
            )
        yield sse("[DONE]")

    async def _whole(self, rid: str, req, events: AsyncIterator[tuple]) -> JSONResponse:
        produced, end = 0, None
        try:
            async for count, finished, status, reason in events:
                produced += count
                if finished:
                    end = (status, reason)
        except _REPLICA_GONE as exc:
            self.counts["failed: replica died mid-stream"] += 1
            msg = f"request {rid}: its replica died after {produced} tokens ({type(exc).__name__})"
            return JSONResponse(error_body(msg, "replica_failed", 502), status_code=502)
        if end is None or end[0] != "finished":
            reason = end[1] if end else "stream ended without a status"
            self.counts[f"failed: {reason}"] += 1
            return JSONResponse(error_body(f"request {rid} failed: {reason}", "request_failed", 500), status_code=500)
        self.counts["finished"] += 1
        text = "".join(self.tokenizer.token_text(i) for i in range(produced))
        body = completion_chunk(rid, req.model, text, "length")
        return JSONResponse({**body, "usage": usage(req.prompt_tokens, produced)})

    def _bad(self, message: str) -> JSONResponse:
        self.counts["bad request"] += 1
        return JSONResponse(error_body(message, "invalid_request_error", 400), status_code=400)

    def _refused(self, reason: str, retry_after: str) -> JSONResponse:
        self.counts[f"refused: {reason}"] += 1
        return JSONResponse(
            error_body(f"refused: {reason}", "overloaded", 429), status_code=429, headers={"Retry-After": retry_after}
        )


def build_app(config: ServeConfig):
    """The application: ``config.replicas`` node replicas behind one ingress."""
    if config.router == "pab":
        router = RequestRouterConfig(
            request_router_class="fairbatching.integrations.ray_serve.router:PABRequestRouter",
            request_router_kwargs={
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
        ray_actor_options={"num_cpus": 0},
    ).bind(config.node)
    return OpenAIIngress.options(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0}).bind(nodes, config)
