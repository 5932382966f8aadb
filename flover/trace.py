"""Traces: requests with arrival times, as JSON Lines, and Poisson (or gamma) workloads.

One request per line with exactly these keys: id, arrival_s, prompt_ids,
max_new_tokens, and optionally temperature, top_k, top_p, seed, stop_ids.
Every number is finite (no NaN, Infinity or 1e309), and arrival_s is at most
``MAX_ARRIVAL_S``: a run on the wall clock waits for each arrival.
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flover.engine.request import Request
from reference import SamplingParams

REQUIRED = ("id", "arrival_s", "prompt_ids", "max_new_tokens")
OPTIONAL = ("temperature", "top_k", "top_p", "seed", "stop_ids")
MAX_ARRIVAL_S = 7 * 24 * 3600  # a week: longer is no benchmark, and time.sleep overflows near 9.2e9 s
_repr = reprlib.Repr()
_repr.maxlist, _repr.maxstring, _repr.maxlong = 8, 40, 40
_shown = _repr.repr  # a value in a one-line message, cut short


class TraceError(ValueError):
    """A trace line that cannot be a request, with its line number."""


class NotFinite:
    """A JSON number that is no finite float (NaN, Infinity, -Infinity, 1e309), kept as written."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _float_or_not_finite(text: str) -> float | NotFinite:
    value = float(text)
    return value if math.isfinite(value) else NotFinite(text)


def _check_finite(value, key: str) -> None:
    if isinstance(value, NotFinite) or (isinstance(value, int) and abs(value) > sys.float_info.max):
        raise ValueError(f"{key} must be a finite number (|x| <= 1.8e308, no NaN or Infinity), got {_shown(value)}")
    for i, item in enumerate(value) if isinstance(value, list) else ():
        _check_finite(item, f"{key}[{i}]")
    for name, item in value.items() if isinstance(value, dict) else ():
        _check_finite(item, f"{key}.{name}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice!r} appears twice; each key at most once")
    return dict(pairs)


def parse_line(line: str):
    """One JSON value; non-finite numbers come back as ``NotFinite`` so a check can name their key."""
    return json.loads(line, parse_constant=NotFinite, parse_float=_float_or_not_finite,
                      object_pairs_hook=_no_duplicate_keys)  # fmt: skip


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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sampling_from_record(record: dict) -> SamplingParams:
    """The flat keys temperature, top_k, top_p, seed; SamplingParams checks their ranges."""
    for key in ("temperature", "top_p"):
        if key in record and not _is_number(record[key]):
            raise ValueError(f"{key} must be a number, got {_shown(record[key])}")
    for key in ("top_k", "seed"):
        if key in record and not _is_integer(record[key]):
            raise ValueError(f"{key} must be an integer, got {_shown(record[key])}")
    return SamplingParams(float(record.get("temperature", 0.0)), record.get("top_k", 0),
                          float(record.get("top_p", 1.0)), record.get("seed", 0))  # fmt: skip


def request_from_record(record: dict) -> Request:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_shown(record)}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    for key, value in record.items():
        _check_finite(value, key)
    prompt, stops = record["prompt_ids"], record.get("stop_ids", [])
    for key, ids in (("prompt_ids", prompt), ("stop_ids", stops)):
        if not isinstance(ids, list) or not all(_is_integer(t) for t in ids):
            raise ValueError(f"{key} must be a list of integers, got {_shown(ids)}")
    arrival, new = record["arrival_s"], record["max_new_tokens"]
    if not _is_number(arrival) or not 0 <= arrival <= MAX_ARRIVAL_S:
        raise ValueError(f"arrival_s must be a number >= 0 and <= {MAX_ARRIVAL_S} (MAX_ARRIVAL_S, a week), "
                         f"got {_shown(arrival)}")  # fmt: skip
    if not _is_integer(new) or new < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {_shown(new)}")
    if not isinstance(record["id"], (int, str)) or isinstance(record["id"], bool):
        raise ValueError(f"id must be an integer or a string, got {_shown(record['id'])}")
    return Request(record["id"], float(arrival), tuple(prompt), new, sampling_from_record(record), tuple(stops))


def read_trace(path: str | Path) -> list[Request]:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    requests, ids = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = request_from_record(parse_line(line))
        except (ValueError, TypeError, RecursionError) as bad:  # json.JSONDecodeError is a ValueError
            raise TraceError(f"{path}:{number}: {bad}") from None
        if request.id in ids:
            raise TraceError(f"{path}:{number}: duplicate id {_shown(request.id)}")
        ids.add(request.id)
        requests.append(request)
    if not requests:
        raise TraceError(f"{path}: the trace has no requests")
    return requests


def record_of(request: Request) -> dict:
    s = request.sampling
    return {"id": request.id, "arrival_s": request.arrival_s, "prompt_ids": list(request.prompt_ids),
            "max_new_tokens": request.max_new_tokens, "temperature": s.temperature, "top_k": int(s.top_k),
            "top_p": s.top_p, "seed": int(s.seed), "stop_ids": list(request.stop_ids)}  # fmt: skip


def write_trace(requests: Iterable[Request], out) -> None:
    for request in requests:
        out.write(json.dumps(record_of(request), allow_nan=False) + "\n")


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
    if not arrivals[-1] <= MAX_ARRIVAL_S:
        raise ValueError(f"rate {rate} spreads {n} requests over {arrivals[-1]:.3g} s; arrivals must stay "
                         f"<= {MAX_ARRIVAL_S} s (MAX_ARRIVAL_S, a week): raise the rate")  # fmt: skip
    prompt_lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=n)
    prompts = [tuple(int(t) for t in rng.integers(0, vocab_size, length)) for length in prompt_lens]
    return [Request(i, round(float(arrivals[i]), 6), prompts[i], int(outputs[i]), sampling=SamplingParams(seed=i))
            for i in range(n)]  # fmt: skip
