"""Traces: requests with arrival times, as JSON Lines, and Poisson (or gamma) workloads.

One request per line with exactly these keys: id, arrival_s, prompt_ids,
max_new_tokens, and optionally temperature, top_k, top_p, seed, stop_ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flover.request import Request

REQUIRED = ("id", "arrival_s", "prompt_ids", "max_new_tokens")
OPTIONAL = ("temperature", "top_k", "top_p", "seed", "stop_ids")


class TraceError(ValueError):
    """A trace line that cannot be a request, with its line number."""


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'A:B' (inclusive) or 'A' -> (A, B)."""
    try:
        low, _, high = text.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"{name} must be A:B with integers A <= B, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must be A:B with 1 <= A <= B, got {text!r}")
    return pair


def request_from_record(record: dict) -> Request:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    prompt, stops = record["prompt_ids"], record.get("stop_ids", [])
    for key, ids in (("prompt_ids", prompt), ("stop_ids", stops)):
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{key} must be a list of integers, got {ids!r}")
    arrival, new = record["arrival_s"], record["max_new_tokens"]
    if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not arrival >= 0:
        raise ValueError(f"arrival_s must be a number >= 0, got {arrival!r}")
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {new!r}")
    if not isinstance(record["id"], (int, str)) or isinstance(record["id"], bool):
        raise ValueError(f"id must be an integer or a string, got {record['id']!r}")
    request = Request(record["id"], float(arrival), tuple(prompt), new,
                      float(record.get("temperature", 0.0)), record.get("top_k", 0),
                      float(record.get("top_p", 1.0)), record.get("seed", 0), tuple(stops))  # fmt: skip
    _ = request.sampling  # validates temperature, top_k, top_p, seed
    return request


def read_trace(path: str | Path) -> list[Request]:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    requests, ids = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = request_from_record(json.loads(line))
        except (json.JSONDecodeError, ValueError, TypeError) as bad:
            raise TraceError(f"{path}:{number}: {bad}") from None
        if request.id in ids:
            raise TraceError(f"{path}:{number}: duplicate id {request.id!r}")
        ids.add(request.id)
        requests.append(request)
    if not requests:
        raise TraceError(f"{path}: the trace has no requests")
    return requests


def record_of(request: Request) -> dict:
    return {"id": request.id, "arrival_s": request.arrival_s, "prompt_ids": list(request.prompt_ids),
            "max_new_tokens": request.max_new_tokens, "temperature": request.temperature, "top_k": request.top_k,
            "top_p": request.top_p, "seed": request.seed, "stop_ids": list(request.stop_ids)}  # fmt: skip


def write_trace(requests: Iterable[Request], out) -> None:
    for request in requests:
        out.write(json.dumps(record_of(request)) + "\n")


def poisson_trace(rate: float, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0,
                  burstiness: float = 1.0, vocab_size: int = 256) -> list[Request]:  # fmt: skip
    """n requests, ``rate`` per second on average, lengths uniform in the given inclusive ranges.

    Gaps are exponential (a Poisson process) when burstiness is 1, else gamma with
    shape ``burstiness`` and the same mean: below 1 burstier, above 1 more regular.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second, got {rate}")
    if n < 1:
        raise ValueError(f"requests must be >= 1, got {n}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at t = 0
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=n)
    return [
        Request(i, round(float(arrivals[i]), 6), tuple(int(t) for t in rng.integers(0, vocab_size, prompts[i])),
                int(outputs[i]), seed=i)  # fmt: skip
        for i in range(n)
    ]
