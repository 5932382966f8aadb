"""The JSON the server answers with: OpenAI's ``text_completion`` objects, whole or as server-sent events."""

from __future__ import annotations

import json
import time

from flover.server.completion import Piece

DONE = b"data: [DONE]\n\n"  # the last event of every stream, as OpenAI ends its streams


def sse(obj: dict) -> bytes:
    """One server-sent event carrying ``obj``."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_object(id_: str, model: str, choices: list[dict], usage_: dict | None, created: int | None = None) -> dict:
    return {"id": id_, "object": "text_completion", "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices, "usage": usage_}  # fmt: skip


def choice(text: str, finish_reason: str | None, logprobs: dict | None = None, token_ids: list[int] | None = None) -> dict:
    out = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        out["token_ids"] = token_ids  # vLLM's return_token_ids extension
    return out


def logprobs_of(pieces: list[Piece], tokenizer, offset: int) -> dict:
    """OpenAI's completion logprobs: each token's text, its log probability, the likeliest alternatives,
    and where its text begins (``offset``: characters sent before these pieces)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for piece in pieces:
        tokens.append(tokenizer.decode([piece.token]))
        token_logprobs.append(piece.logprob)
        top.append({tokenizer.decode([t]): lp for t, lp in piece.top})
        offsets.append(offset)
        offset += len(piece.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
