"""The web application: OpenAI's completions endpoint, models, health, metrics and the OpenAPI document.

Every error a client can cause is answered with an OpenAI-style body that
names the field; anything else is a 500 whose details stay in the server's
log, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flover.server import chunks
from flover.server.completion import Completion, Interrupted, Piece
from flover.server.errors import APIError, internal_error
from flover.server.metrics import CONTENT_TYPE
from flover.server.openapi import document
from flover.server.schemas import CompletionRequest, parse_completion_request
from flover.server.service import CompletionService

log = logging.getLogger("flover.server")
MAX_BODY_BYTES = 1 << 20  # a prompt of n_ctx token ids is a few kB; a megabyte is no honest request
OUTCOME_OF_STATUS = {429: "rejected", 503: "rejected", 500: "error"}  # other 4xx: invalid


def create_app(service: CompletionService, shutdown_timeout_s: float = 30.0, version: str = "0") -> Starlette:
    """The app around ``service``; its lifespan starts the engine's thread and stops it."""

    def failed(error: APIError, completion: Completion | None = None) -> Response:
        """Count a refused request now; an accepted one is counted when the engine hands it back."""
        if completion is None:
            service.metrics.count(OUTCOME_OF_STATUS.get(error.status, "invalid"))
        else:
            completion.outcome = completion.outcome or OUTCOME_OF_STATUS.get(error.status, "invalid")
        return error.response()

    async def completions(request: Request) -> Response:
        try:
            body = parse_completion_request(await read_body(request))
            completion = service.submit(body)
        except APIError as error:
            return failed(error)
        except Exception:
            log.exception("internal error while accepting a request")
            return failed(internal_error())
        if body.stream:
            return StreamingResponse(stream(service, completion, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            return await whole(service, completion, body, request)
        except APIError as error:
            return failed(error, completion)
        except Exception:
            log.exception("internal error while answering %s", completion.id)
            return failed(internal_error(), completion)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": service.name, "object": "model", "created": started,
                                                          "owned_by": "flover", "max_model_len": service.config.n_ctx}]})

    async def health(request: Request) -> Response:
        if service.live.error is not None:
            return APIError(503, "the engine stopped after an internal error", code="engine_failed").response()
        if service.draining:
            return APIError(503, "shutting down", code="shutting_down").response()
        return JSONResponse({"status": "ok", "model": service.name, "policy": service.policy,
                             "running": service.live.running, "waiting": service.live.waiting})  # fmt: skip

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document(version))

    async def http_error(request: Request, error: HTTPException) -> Response:
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()

    async def unexpected(request: Request, error: Exception) -> Response:
        return failed(internal_error())  # the traceback goes to the log, never to the client

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(service.stop, shutdown_timeout_s)

    started = int(time.time())
    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", metrics), Route("/openapi.json", openapi)]  # fmt: skip
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: unexpected})


async def read_body(request: Request) -> bytes:
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over {MAX_BODY_BYTES} bytes, the limit", code="body_too_large")
        parts.append(part)
    return b"".join(parts)


async def stream(service: CompletionService, completion: Completion, body: CompletionRequest) -> AsyncIterator[bytes]:
    """One chunk per token; the last carries the finish reason and the usage; then ``data: [DONE]``."""
    prompt_tokens, created, sent = len(completion.request.prompt_ids), int(time.time()), 0
    try:
        async for piece in completion.pieces(service.live.cancel):
            logprobs = chunks.logprobs_of([piece], service.tokenizer, sent) if completion.logprobs is not None else None
            sent += len(piece.text)
            used = chunks.usage(prompt_tokens, completion.generated) if piece.finish_reason else None
            ids = [piece.token] if body.return_token_ids else None
            yield chunks.sse(chunks.completion_object(completion.id, service.name,
                                                      [chunks.choice(piece.text, piece.finish_reason, logprobs, ids)],
                                                      used, created))  # fmt: skip
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunks.sse(chunks.completion_object(completion.id, service.name, [],
                                                      chunks.usage(prompt_tokens, completion.generated), created))  # fmt: skip
    except Interrupted as interrupted:
        yield chunks.sse(interruption(interrupted).body())
    except Exception:  # the stream has begun: the error goes in it, as an event, then the stream ends
        log.exception("internal error while streaming %s", completion.id)
        completion.outcome = "error"
        yield chunks.sse(internal_error().body())
    finally:
        service.close(completion)
    yield chunks.DONE


async def whole(service: CompletionService, completion: Completion, body: CompletionRequest, request: Request) -> Response:
    """Wait for every token, or for the client to go away (then cancel the request)."""
    pieces: list[Piece] = []

    async def collect() -> None:
        async for piece in completion.pieces(service.live.cancel):
            pieces.append(piece)

    collecting, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collecting, gone):
            task.cancel()
        service.close(completion)
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=499)  # nobody is listening; the engine drops the request at its next iteration
    if isinstance(collecting.exception(), Interrupted):
        raise interruption(collecting.exception())
    collecting.result()
    text = "".join(p.text for p in pieces)
    logprobs = chunks.logprobs_of(pieces, service.tokenizer, 0) if completion.logprobs is not None else None
    ids = [p.token for p in pieces] if body.return_token_ids else None
    finish = pieces[-1].finish_reason if pieces else "length"
    return JSONResponse(chunks.completion_object(completion.id, service.name, [chunks.choice(text, finish, logprobs, ids)],
                                                 chunks.usage(len(completion.request.prompt_ids), completion.generated)))


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def interruption(interrupted: Interrupted) -> APIError:
    if interrupted.reason == "cancelled":
        return APIError(503, "the server is shutting down; the request was cancelled before it finished",
                        code="shutting_down")  # fmt: skip
    return APIError(500, "the engine stopped after an internal error; the server log has the details",
                    code="engine_failed")  # fmt: skip
