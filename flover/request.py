"""Requests, and what happens to each one while it is served."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reference import Sampler, SamplingParams


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(slots=True)
class Sequence:
    """A request being served: its sampler, the tokens made so far and its timestamps."""

    request: Request
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)
    position: int = 0  # where the next fed token goes in the KV cache
    admitted_s: float = float("nan")  # prefill starts
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    logits: list[np.ndarray] | None = None

    @classmethod
    def start(cls, request: Request, keep_logits: bool = False) -> Sequence:
        return cls(request, Sampler(request.sampling), position=len(request.prompt_ids),
                   logits=[] if keep_logits else None)  # fmt: skip

    @property
    def done(self) -> bool:
        r = self.request
        return len(self.tokens) >= r.max_new_tokens or (bool(self.tokens) and self.tokens[-1] in r.stop_ids)

    def accept(self, logits: np.ndarray, now: float) -> bool:
        """Sample the next token from ``logits`` [V]; True when the request is finished."""
        if self.logits is not None:
            self.logits.append(np.array(logits, copy=True))
        self.tokens.append(self.sampler(logits))
        if len(self.tokens) == 1:
            self.first_token_s = now
        if self.done:
            self.finish_s = now
            return True
        return False

    def advance(self) -> None:
        self.position += 1


@dataclass(frozen=True, slots=True)
class RequestResult:
    id: int | str
    arrival_s: float
    admitted_s: float
    first_token_s: float
    finish_s: float
    tokens: list[int]
    instance: int = 0  # which model instance served it (the instances policy)
    logits: list[np.ndarray] | None = None
    returned_s: float | None = None  # when a server that does not stream hands it back; None: at finish_s

    @property
    def returned(self) -> float:
        return self.finish_s if self.returned_s is None else self.returned_s

    @classmethod
    def of(cls, seq: Sequence, instance: int = 0, returned_s: float | None = None) -> RequestResult:
        return cls(seq.request.id, seq.request.arrival_s, seq.admitted_s, seq.first_token_s, seq.finish_s,
                   list(seq.tokens), instance, seq.logits, returned_s)  # fmt: skip

    def as_json(self) -> dict:
        return {"id": self.id, "tokens": self.tokens, "arrival_s": self.arrival_s,
                "first_token_s": self.first_token_s, "finish_s": self.finish_s}  # fmt: skip
