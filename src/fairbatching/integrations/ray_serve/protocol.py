"""The OpenAI ``/v1/completions`` wire format, as far as a serving replica needs it: request bodies parsed and
checked (a bad one is a 400 naming the field), the trivial local tokenizer, and the response/SSE bodies.

``RequestChecker`` is the one place a body is checked before it reaches a replica: JSON, every field, and the
SLO against what the node can do (floor) and the server's ceiling. The SLO is a trust boundary: a client that
asks for an impossible TPOT would make admission refuse everyone else's requests to protect its own.

Per-request SLOs ride in ``vllm_xargs`` (``{"ttft_slo": s, "tpot_slo": s}``), the same field vLLM passes
to our vLLM scheduler, so one client drives both servers. The simulated replica produces no real text:
every output token is one letter, and the output length is ``max_tokens`` (as benchmark clients ask with
``ignore_eos``).
"""

import json
import math
import string
import time
from dataclasses import dataclass
from typing import Any

from fairbatching.core.kv import token_block_hashes
from fairbatching.core.request import SLO
from fairbatching.costmodel.model import CostModel, attn_work
from fairbatching.errors import ConfigError

MAX_TOKEN_ID = 1 << 31


class BadRequest(ValueError):
    """A request body the endpoint cannot serve; the message names the field (HTTP 400)."""


class ByteTokenizer:
    """One token per UTF-8 byte: the local tokenizer when no checkpoint tokenizer is around. Token counts
    are then byte counts, which is all a simulated replica prices."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def token_text(self, index: int) -> str:
        """Text of the ``index``-th output token of a simulated replica."""
        return string.ascii_lowercase[index % 26]


@dataclass(frozen=True)
class CompletionRequest:
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    slo: SLO
    model: str
    # With prefix caching, chained hashes of the prompt's full KV blocks (``core.kv``, from its token ids): the
    # router weighs where they are cached and the node looks them up (empty without caching).
    block_hashes: tuple[int, ...] = ()


def _number(body: dict, key: str, default: float, kind: type, minimum: float) -> Any:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past any float
        raise BadRequest(f"'{key}' is too large ({len(str(value))} digits)") from None
    if not finite or value < minimum:
        raise BadRequest(f"'{key}' must be >= {minimum:g}, got {value!r}")
    return value


# OpenAI sampling fields the simulated nodes do not act on, checked for their JSON type and range: a client's typo
# is a 400, not silently ignored (stricter than vLLM, which coerces "0.5" to a number). Each: (type, range).
SAMPLING_FIELDS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "seed": (int, -(2**63), 2**64 - 1),
    "logprobs": (int, 0, 20),
}


def _sampling(body: dict) -> None:
    for key, (kind, low, high) in SAMPLING_FIELDS.items():
        if body.get(key) is None:
            continue
        value = _number(body, key, 0, kind, low)
        if value > high:
            raise BadRequest(f"'{key}' must be <= {high:g}, got {value!r}")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest(f"'stop' must be a string or a list of strings, got {stop!r}")
    for key in ("echo", "ignore_eos"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise BadRequest(f"'{key}' must be true or false, got {body[key]!r}")


def _prompt_ids(prompt: Any, tokenizer: ByteTokenizer, nested: bool = False) -> list[int]:
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt)
        except UnicodeEncodeError:
            raise BadRequest("'prompt' is not valid Unicode text (it holds a lone surrogate)") from None
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < MAX_TOKEN_ID for t in prompt):
            raise BadRequest("'prompt' token ids must be non-negative 32-bit integers")
        ids = prompt
    elif not nested and isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        return _prompt_ids(prompt[0], tokenizer, nested=True)  # a batch of one prompt
    elif not nested and isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise BadRequest("'prompt' holds several prompts; send one prompt per request")
    else:
        raise BadRequest("'prompt' must be a string, a non-empty list of token ids, or a list of one of these")
    if not ids:
        raise BadRequest("'prompt' is empty")
    return ids


def parse_completion(
    body: Any,
    default_slo: SLO,
    served_model: str,
    max_model_len: int,
    tokenizer: ByteTokenizer,
    block_size: int = 0,
) -> CompletionRequest:
    """The request ``body`` (already JSON-decoded) checked field by field; raises ``BadRequest``. With a
    ``block_size`` (prefix caching) the prompt's block hashes come with it."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if "prompt" not in body:
        raise BadRequest("'prompt' is required")
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}")
    if model != served_model:
        raise BadRequest(f"model {model!r} is not served here; this server serves {served_model!r}")
    ids = _prompt_ids(body["prompt"], tokenizer)
    prompt_tokens = len(ids)
    max_tokens = _number(body, "max_tokens", 16, int, 1)
    _sampling(body)
    n = _number(body, "n", 1, int, 1)
    if n != 1:
        raise BadRequest(f"'n' must be 1 (one completion per request), got {n}")
    if prompt_tokens + max_tokens > max_model_len:
        raise BadRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the maximum context {max_model_len}"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest(f"'stream_options' must be an object, got {options!r}")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest(f"'stream_options.include_usage' must be true or false, got {include_usage!r}")
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise BadRequest(f"'vllm_xargs' must be an object, got {xargs!r}")
    ttft = _number(xargs, "ttft_slo", default_slo.ttft, float, 0)
    tpot = _number(xargs, "tpot_slo", default_slo.tpot, float, 0)
    if ttft <= 0 or tpot <= 0:
        raise BadRequest(f"vllm_xargs ttft_slo and tpot_slo must be positive seconds, got {ttft!r} and {tpot!r}")
    hashes = token_block_hashes(ids, block_size) if block_size else ()
    return CompletionRequest(prompt_tokens, max_tokens, stream, include_usage, SLO(ttft, tpot), model, hashes)


@dataclass(frozen=True)
class Limits:
    """What the endpoint accepts beyond the fields' own rules. 4 MiB holds the default 128k-token context as
    JSON token ids (up to ~11 bytes each: ``2147483647, ``) with room; ten seconds is generous for a
    client on any working link to send that much."""

    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 10.0
    max_slo_s: float = 600.0  # the ceiling on a client's ttft_slo and tpot_slo

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        for name, value in (("--body-timeout", self.body_timeout_s), ("--max-slo", self.max_slo_s)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number of seconds, got {value!r}")


class RequestChecker:
    """Checks request bodies for one server: JSON, fields (``parse_completion``), and the SLO between the
    floor of what the node can do (``cost``: one prefill of the prompt for TTFT, one decode step after it for
    TPOT) and ``limits.max_slo_s``; with a ``block_size`` (the nodes cache prefixes) each prompt is hashed."""

    def __init__(
        self,
        served_model: str,
        max_model_len: int,
        default_slo: SLO,
        cost: CostModel,
        limits: Limits,
        tokenizer: ByteTokenizer | None = None,
        block_size: int = 0,
    ) -> None:
        self.served_model = served_model
        self.max_model_len = max_model_len
        self.default_slo = default_slo
        self.cost = cost
        self.limits = limits
        self.tokenizer = tokenizer or ByteTokenizer()
        self.block_size = block_size

    def parse_bytes(self, raw: bytes) -> CompletionRequest:
        """A raw body, decoded and checked; raises ``BadRequest``."""
        try:
            body = json.loads(raw)
        except RecursionError:
            raise BadRequest("the request body is not acceptable JSON: it nests too deeply") from None
        except ValueError as exc:  # not JSON, not UTF-8, or an integer literal past Python's digit limit
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        return self.parse(body)

    def parse(self, body: Any) -> CompletionRequest:
        req = parse_completion(
            body, self.default_slo, self.served_model, self.max_model_len, self.tokenizer, self.block_size
        )
        n = req.prompt_tokens
        floors = {
            "ttft_slo": (req.slo.ttft, self.cost.predict(n, n, 1, attn_work(n, 0)), f"one prefill of its {n} tokens"),
            "tpot_slo": (req.slo.tpot, self.cost.predict(1, n + 1, 1, attn_work(1, n)), "one decode step"),
        }
        for name, (value, floor, what) in floors.items():
            if value < floor:
                raise BadRequest(
                    f"vllm_xargs '{name}' {value:g} s is below {what} on this server ({floor:.3g} s): "
                    "no schedule can meet it"
                )
            if value > self.limits.max_slo_s:
                raise BadRequest(
                    f"vllm_xargs '{name}' {value:g} s is above this server's ceiling ({self.limits.max_slo_s:g} s)"
                )
        return req


def error_body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
