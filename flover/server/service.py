"""The server's side of the engine: accept a checked request, follow its tokens, cancel it when its client goes.

Handlers run on the web server's event loop; the engine runs on its own
thread (``LiveEngine``). Tokens cross from the engine's thread to the loop
through ``Completion.deliver``; nothing else crosses, so the numbers a
client receives are the engine's, bit for bit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from pathlib import Path

import numpy as np

from flover.engine import LiveEngine, QueueFull, Request, RequestResult, RequestState
from flover.server.completion import Completion, Ended, TokenEvent
from flover.server.errors import APIError, shown
from flover.server.metrics import ServerMetrics
from flover.server.schemas import DEFAULT_MAX_TOKENS, GREEDY_BELOW, CompletionRequest
from flover.server.text import TextStream
from reference import SamplingParams

log = logging.getLogger("flover.server")


def served_name(model: str) -> str:
    """What /v1/models calls the model: a preset's name, or a checkpoint directory's last part."""
    return Path(model).name if Path(model).is_dir() else model


class CompletionService:
    def __init__(self, live: LiveEngine, tokenizer, model: str, policy: str = "") -> None:
        self.live = live
        self.engine = live.engine
        self.config = live.engine.backend.config
        self.tokenizer = tokenizer
        self.model = model  # as given to --model
        self.name = served_name(model)
        self.policy = policy  # the policy's label, which /health tells a load generator
        self.metrics = ServerMetrics(live)
        self.open: dict[str, Completion] = {}  # accepted, not yet handed back by the engine
        self.draining = False  # shutting down: accept nothing new
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self.engine.on_token, self.engine.on_finish = self._on_token, self._on_finish
        self.engine.keep_logits = True  # for logprobs; a request that asks for none stops it at its first token
        live.on_steps, live.on_error = self.metrics.steps, self._on_error

    # ------------------------------------------------------------------ on the event loop

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.live.start()

    def stop(self, timeout: float) -> None:
        """Cancel what is still open and stop the engine's thread."""
        self.draining = True
        for completion in list(self.open.values()):
            self.live.cancel(completion.request.id)
        self.live.stop(timeout)

    @property
    def healthy(self) -> bool:
        return self.live.error is None and not self.draining

    def submit(self, body: CompletionRequest) -> Completion:
        """Check ``body`` against the model and queue it; APIError 400, 404, 429 or 503 if it cannot be."""
        if self.live.error is not None:
            raise APIError(503, "the engine stopped after an internal error; the server log has the details",
                           code="engine_failed")  # fmt: skip
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests", code="shutting_down")
        if body.model is not None and body.model not in (self.name, self.model):
            raise APIError(404, f"model {shown(body.model)} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        request = self._request(body)
        completion = Completion(request, TextStream(self.tokenizer, body.stop_strings), body.logprobs, self.loop)
        self.open[completion.id] = completion  # before submit: the first token may come before submit returns
        try:
            self.live.submit(request)
        except QueueFull as error:
            del self.open[completion.id]
            raise APIError(429, f"the server is full: {error}; retry later", code="queue_full") from None
        except ValueError as error:  # a request that could never fit the KV memory
            del self.open[completion.id]
            raise APIError(400, str(error), param="max_tokens") from None
        except RuntimeError:
            del self.open[completion.id]
            raise APIError(503, "the server is shutting down and accepts no new requests", code="shutting_down") from None
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        return completion

    def close(self, completion: Completion) -> None:
        """The handler is done with it: if the engine still computes it (its client went away), cancel it."""
        if not completion.done:
            self.live.cancel(completion.request.id)

    def _request(self, body: CompletionRequest) -> Request:
        n_ctx, vocab = self.config.n_ctx, self.config.vocab_size
        prompt = self._prompt_ids(body.prompt)
        for field, ids in (("prompt", prompt), ("stop_token_ids", body.stop_token_ids or ())):
            bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"{field}[{bad}] = {ids[bad]} is outside the vocabulary 0..{vocab - 1}", param=field)
        if len(prompt) >= n_ctx:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context n_ctx is {n_ctx}, so at most "
                                f"{n_ctx - 1} leave room for one new token", param="prompt")  # fmt: skip
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if len(prompt) + max_tokens > n_ctx:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens = "
                                f"{len(prompt) + max_tokens} exceeds the context n_ctx {n_ctx}; at most "
                                f"{n_ctx - len(prompt)} new tokens fit", param="max_tokens")  # fmt: skip
        temperature = 1.0 if body.temperature is None else body.temperature
        sampling = SamplingParams(0.0 if temperature < GREEDY_BELOW else temperature, max(body.top_k or 0, 0),
                                  1.0 if body.top_p is None else body.top_p,
                                  secrets.randbelow(2**63) if body.seed is None else body.seed)  # fmt: skip
        return Request(f"cmpl-{next(self._ids)}-{secrets.token_hex(6)}", 0.0, tuple(prompt), max_tokens, sampling,
                       tuple(body.stop_token_ids or ()))  # fmt: skip

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        try:
            return [int(t) for t in self.tokenizer.encode(prompt)]
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. "\ud800"
            raise APIError(400, f"the prompt is not valid Unicode: {error.reason} at character {error.start}",
                           param="prompt") from None  # fmt: skip

    # ------------------------------------------------------------------ on the engine's thread

    def _on_token(self, state: RequestState) -> None:
        completion = self.open.get(str(state.request.id))
        logits = state.logits.pop() if state.logits else None
        if completion is None or completion.logprobs is None:
            state.logits = None  # copies no more of its logits
        self.metrics.generation_tokens.inc()
        if completion is None:
            return
        token, done = state.ids[-1], state.done
        reason = state.finish_reason if done else None
        if logits is None or completion.logprobs is None:
            completion.deliver(TokenEvent(token, done, reason))
            return
        z = logits.astype(np.float64) - logits.max()  # [V]
        logprobs = z - np.log(np.exp(z).sum())  # log-softmax of the model's logits, before temperature and cuts
        k = completion.logprobs
        top = np.argpartition(-logprobs, k)[:k] if 0 < k < len(logprobs) else np.arange(len(logprobs) if k else 0)
        top = top[np.argsort(-logprobs[top], kind="stable")]
        completion.deliver(TokenEvent(token, done, reason, float(logprobs[token]),
                                      tuple((int(t), float(logprobs[t])) for t in top)))  # fmt: skip

    def _on_finish(self, result: RequestResult) -> None:
        completion = self.open.pop(str(result.id), None)
        outcome = completion.outcome if completion is not None and completion.outcome else result.finish_reason
        self.metrics.finished(result, outcome)
        if completion is not None and result.finish_reason == "cancelled" and not completion.done:
            completion.deliver(Ended("cancelled"))

    def _on_error(self, error: BaseException) -> None:
        log.error("the engine failed: %r; open requests are answered with an error", error)
        for completion in list(self.open.values()):
            completion.deliver(Ended("error"))
