"""The request body of ``POST /v1/completions``, checked field by field; the OpenAPI document is built from it.

The fields are OpenAI's that make sense for one model serving one choice,
plus vLLM's extensions ``top_k``, ``stop_token_ids`` and ``return_token_ids``.
Types are strict (``"5"`` is no integer, ``true`` no number) and unknown
fields are refused, so a misspelled option never passes unnoticed. Limits
that depend on the model (the context, the vocabulary) are checked by the
service, which knows it.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flover.server.errors import APIError, shown
from flover.trace import _no_duplicate_keys  # the trace reader's rule: a key given twice is an error

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (vLLM's rule): dividing by it would overflow
MAX_STOP_STRINGS = 4  # OpenAI's limit

TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]
Prompt = Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="end the stream with a chunk that holds only the usage")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served model's name, as GET /v1/models lists it")
    prompt: Prompt = Field(description="text, or a list of token ids")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(0, ge=-1, description="keep the k likeliest tokens; 0 or -1: all (vLLM's extension)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the request's sampler seed; default: a random one")
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS,
                                                       description="strings that end the text (not included)")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that end the text (not included)")
    stream: bool | None = Field(False, description="answer with server-sent events, one chunk per token")
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=1, description="choices per request: only 1")
    logprobs: int | None = Field(None, ge=0, le=5, description="log probabilities of the sampled and the likeliest tokens")
    user: str | None = Field(None, description="an end-user id; accepted and ignored")
    return_token_ids: bool | None = Field(False, description="add each choice's token ids (vLLM's extension)")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


HINTS = {  # what each field must be, for the error message that names it
    "model": "a string, the served model's name",
    "prompt": "a non-empty string or a non-empty list of token ids (integers >= 0)",
    "max_tokens": "an integer >= 1",
    "temperature": "a number from 0 to 2",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 0 (0 or -1: no cut)",
    "seed": "an integer from 0 to 2**63 - 1",
    "stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
    "stop_token_ids": "a list of token ids (integers >= 0)",
    "stream": "true or false",
    "stream_options": 'an object {"include_usage": true or false}',
    "n": "1 (this server returns one choice per request)",
    "logprobs": "an integer from 0 to 5",
    "user": "a string",
    "return_token_ids": "true or false",
}


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The body as a request, or an APIError 400 naming the field and what it must be."""
    try:
        body = json.loads(raw, parse_constant=_no_constants, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__} {shown(body)}")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise field_error(error, body) from None


def field_error(error: ValidationError, body: dict) -> APIError:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden" and len(first["loc"]) > 1:
        return APIError(400, f"{field} has an unknown field {shown(first['loc'][-1])}; it must be {HINTS[field]}", param=field)
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {shown(field)}; the fields are {', '.join(HINTS)}", param=field)
    if first["type"] == "string_unicode":
        return APIError(400, f"{field} is not valid Unicode text: it holds a lone surrogate (\\ud800 to \\udfff)", param=field)
    if first["type"] == "missing":
        return APIError(400, f"{field} is required: {HINTS.get(field, 'a value')}", param=field)
    return APIError(400, f"{field} must be {HINTS.get(field, 'valid')}, got {shown(body.get(field))}", param=field)
