"""Trace replay against any OpenAI-compatible server (ours, vLLM's, Ray Serve LLM's): every request of a
workload is sent at its arrival time as a streaming ``/v1/completions`` call (prompt as token ids of the
trace's length, ``max_tokens`` = ``min_tokens`` = the trace's output length, ``ignore_eos``, the SLO in
``vllm_xargs``), and every streamed chunk is stamped when it arrives. The result is the package's own
``Request`` records, so ``metrics.summarize`` reports TTFT, TPOT, TBT, SLO attainment and goodput exactly as
for ``simulate``. Each request ends exactly once: finished, refused (HTTP 429, with the server's reason) or
failed (any other error, with its message); a refused or failed request meets no SLO.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from fairbatching.core.request import SLO, Request, RequestStatus
from fairbatching.errors import ConfigError
from fairbatching.metrics.summary import Summary, summarize
from fairbatching.workloads.spec import RequestSpec, Workload

VOCAB = 30000  # prompt token ids are drawn below this: valid for any Llama-family tokenizer


@dataclass(frozen=True)
class BenchOptions:
    url: str
    slo: SLO
    model: str | None = None  # default: the first model the server lists
    timeout_s: float = 600.0
    seed: int = 0


@dataclass
class BenchResult:
    requests: list[Request]
    duration_s: float
    model: str

    def outcomes(self) -> Counter[str]:
        """How every request ended: ``finished``, or ``rejected: reason`` / ``failed: reason``."""
        return Counter(
            "finished" if r.status is RequestStatus.FINISHED else f"{r.status.value}: {r.finish_reason}"
            for r in self.requests
        )

    def summary(self, label: str, workload: str) -> Summary:
        end = max((r.token_times[-1] for r in self.requests if r.token_times), default=self.duration_s)
        return summarize(label, workload, self.requests, end, 0.0, 0)


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        return str(body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("message", text))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return text.strip()[:300] or "(empty body)"


async def _model(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(f"{url}/v1/models") as resp:
            data = await resp.json(content_type=None)
        return data["data"][0]["id"]
    except (aiohttp.ClientError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"--url {url}: could not list its models ({exc}); pass --model") from None


async def _one(session: aiohttp.ClientSession, url: str, body: dict, r: Request, t0: float, timeout: float) -> None:
    """Send one request and fill ``r`` in: token times (relative to ``t0``), status and reason."""
    status, reason = RequestStatus.FAILED, "stream ended without a finish"
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                message = _error_message(await resp.text())
                if resp.status == 429:
                    status, reason = RequestStatus.REJECTED, message
                else:
                    reason = f"HTTP {resp.status}: {message}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    reason = _error_message(data.decode())
                    return
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    r.token_times.append(time.perf_counter() - t0)
                if choices and choices[0].get("finish_reason"):
                    status, reason = RequestStatus.FINISHED, choices[0]["finish_reason"]
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        r.status, r.finish_reason = status, reason


async def replay(
    workload: Workload, options: BenchOptions, progress: Callable[[int, int], None] | None = None
) -> BenchResult:
    """Replay ``workload`` against ``options.url`` on the wall clock; one ``Request`` per spec, in order."""
    url = options.url.rstrip("/")
    specs: list[RequestSpec] = sorted(workload.requests, key=lambda s: s.arrival)
    rng = random.Random(options.seed)
    records: list[Request | None] = [None] * len(specs)
    connector = aiohttp.TCPConnector(limit=0)  # no client-side queue: every request goes out on time
    async with aiohttp.ClientSession(connector=connector) as session:
        model = options.model or await _model(session, url)
        bodies = [
            {
                "model": model,
                "prompt": [rng.randrange(VOCAB) for _ in range(s.prompt_len)],
                "max_tokens": s.output_len,
                "min_tokens": s.output_len,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "vllm_xargs": {"ttft_slo": (s.slo or options.slo).ttft, "tpot_slo": (s.slo or options.slo).tpot},
            }
            for s in specs
        ]
        base = specs[0].arrival if specs else 0.0
        done = 0
        t0 = time.perf_counter()

        async def send(i: int) -> None:
            nonlocal done
            s = specs[i]
            await asyncio.sleep(max(0.0, s.arrival - base - (time.perf_counter() - t0)))
            # Arrival is when it is sent (as `vllm bench serve` measures): the server's latency, not the client's.
            r = records[i] = Request(s.request_id, time.perf_counter() - t0, s.prompt_len, s.slo or options.slo)
            await _one(session, url, bodies[i], r, t0, options.timeout_s)
            done += 1
            if progress is not None:
                progress(done, len(specs))

        await asyncio.gather(*(send(i) for i in range(len(specs))))
        duration = time.perf_counter() - t0
    return BenchResult(records, duration, model)
