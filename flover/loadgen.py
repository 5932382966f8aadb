"""A load generator that speaks HTTP: a trace replayed against an OpenAI-compatible server by streaming clients.

Each request of the trace is sent at its arrival time (on the client's
clock, from the first send) as ``POST /v1/completions`` with ``stream``, and
its server-sent events are read as they come. What the client sees is what
it records: sent (its arrival), the first token, each later token, the last
one. The results read like the engine's own (``RequestResult``), so the
report, the JSON and the plots of ``flover bench`` take them unchanged.

The body carries the trace's sampling and asks for the usage at the end
(``stream_options``) and for the token ids (vLLM's ``return_token_ids``);
``top_k`` and ``stop_token_ids`` (vLLM's extensions too) only where the
trace uses them. This module imports nothing of the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from flover.engine.request import Request


@dataclass(slots=True)
class ClientResult:
    """One request as its client saw it; times in seconds from the replay's start."""

    id: int | str
    arrival_s: float  # sent
    first_token_s: float = float("nan")
    finish_s: float = float("nan")  # the last token, or the refusal
    tokens: list[int] = field(default_factory=list)  # the ids when the server returns them, else -1 per token
    token_times: list[float] = field(default_factory=list)  # when each chunk with new tokens arrived
    text: str = ""
    finish_reason: str | None = None
    status: int = 0  # HTTP status; 0: no answer (the connection failed)
    error: str | None = None  # why it failed; None: it succeeded

    @property
    def admitted_s(self) -> float:  # a client cannot see admission: the timeline shows no waiting phase
        return self.arrival_s

    @property
    def returned(self) -> float:
        return self.finish_s

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict:
        return {"id": self.id, "tokens": self.tokens, "arrival_s": self.arrival_s, "admitted_s": self.admitted_s,
                "first_token_s": self.first_token_s, "finish_s": self.finish_s, "finish_reason": self.finish_reason,
                "status": self.status, "error": self.error}  # fmt: skip


def body_of(request: Request, model: str | None) -> dict:
    """The completions request for a trace request: token ids in, the trace's length and sampling."""
    s = request.sampling
    body = {"prompt": list(request.prompt_ids), "max_tokens": request.max_new_tokens, "temperature": s.temperature,
            "top_p": s.top_p, "seed": int(s.seed), "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}  # fmt: skip
    if model is not None:
        body["model"] = model
    if s.top_k:
        body["top_k"] = int(s.top_k)
    if request.stop_ids:
        body["stop_token_ids"] = list(request.stop_ids)
    return body


async def stream_one(client: httpx.AsyncClient, url: str, request: Request, model: str | None, now: Callable[[], float],
                     ) -> ClientResult:  # fmt: skip
    result = ClientResult(request.id, now())
    usage = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body_of(request, model)) as response:
            result.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                result.finish_s = now()  # when the refusal came
                result.error = f"HTTP {response.status_code}: {error_message(response.text)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if line[5:].strip() == "[DONE]":
                    break
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    result.error = f"in the stream: {error_message(json.dumps(chunk))}"
                    break
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    took(result, choice, now())
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"
    if result.error is None and usage and usage.get("completion_tokens", 0) > len(result.tokens):
        result.tokens += [-1] * (usage["completion_tokens"] - len(result.tokens))  # a server that sent no ids
    if result.error is None and not result.token_times:
        result.error = "the stream ended without a token"
    return result


def took(result: ClientResult, choice: dict, t: float) -> None:
    """A chunk's choice: new tokens (their ids, or one per chunk of new text), its text, maybe the end."""
    ids = choice.get("token_ids")
    new = list(ids) if ids is not None else ([-1] if choice.get("text") else [])
    if new:
        if not result.token_times:
            result.first_token_s = t
        result.token_times.append(t)
        result.tokens += new
        result.finish_s = t
    result.text += choice.get("text") or ""
    result.finish_reason = choice.get("finish_reason") or result.finish_reason


def error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def replay(url: str, requests: Sequence[Request], model: str | None = None, timeout_s: float = 600.0,
                 on_finish: Callable[[ClientResult], None] | None = None) -> list[ClientResult]:  # fmt: skip
    """Send every request at its arrival time, all streams at once; the results in the trace's order."""
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - start

        async def at_arrival(request: Request) -> ClientResult:
            await asyncio.sleep(max(0.0, request.arrival_s - now()))
            result = await stream_one(client, url, request, model, now)
            if on_finish is not None:
                on_finish(result)
            return result

        return list(await asyncio.gather(*(at_arrival(r) for r in requests)))


def served_model(url: str, timeout_s: float = 10.0) -> str | None:
    """The first model ``GET /v1/models`` lists (None if it lists none); ValueError if the server cannot be reached."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise ValueError(f"cannot reach {url}: {error}") from None
    try:
        data = response.json()["data"]
        return data[0]["id"] if data else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None

