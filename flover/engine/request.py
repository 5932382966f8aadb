"""Requests, and what happens to each one while it is served."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference import Sampler, SamplingParams


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()


@dataclass(slots=True, eq=False)  # one object per request: compared by identity
class RequestState:
    """A request being served: its sampler, its tokens, how many of them its KV memory holds, its timestamps.

    ``ids`` is the prompt followed by every generated token; ``cached`` counts
    the leading ids whose K and V are in memory. The next lane feeds
    ``ids[cached:]`` (the prompt, a chunk of it, or the last token), and a
    request that loses its memory (preempted) starts again from cached = 0:
    its tokens are kept, so recomputing them gives the same logits.
    """

    request: Request
    sampler: Sampler
    ids: list[int]
    generated: int = 0
    cached: int = 0
    admitted_s: float = float("nan")  # first admitted into memory
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    logits: list[np.ndarray] | None = None
    preempted: int = 0  # times its memory was taken back

    @classmethod
    def start(cls, request: Request, keep_logits: bool = False) -> RequestState:
        return cls(request, Sampler(request.sampling), list(request.prompt_ids),
                   logits=[] if keep_logits else None)  # fmt: skip

    @property
    def tokens(self) -> list[int]:
        """The generated tokens."""
        return self.ids[len(self.ids) - self.generated :]

    @property
    def uncached(self) -> int:
        """Ids still to feed before the next token can be sampled."""
        return len(self.ids) - self.cached

    @property
    def finish_reason(self) -> str:
        """``stop`` if a stop id ended it, else ``length`` (OpenAI's names)."""
        return "stop" if self.generated and self.ids[-1] in self.request.stop_ids else "length"

    @property
    def done(self) -> bool:
        r = self.request
        return self.generated >= r.max_new_tokens or (self.generated > 0 and self.ids[-1] in r.stop_ids)

    def accept(self, logits: np.ndarray, now: float) -> bool:
        """Sample the next token from ``logits`` [V]; True when the request is finished."""
        if self.logits is not None:
            self.logits.append(np.array(logits, copy=True))
        self.ids.append(self.sampler(logits))
        self.generated += 1
        if self.generated == 1:
            self.first_token_s = now
        if self.done:
            self.finish_s = now
            return True
        return False


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
    preempted: int = 0  # times its KV memory was taken back and recomputed (paged layout)
    finish_reason: str = "length"  # length, stop, or cancelled (its client went away)

    @property
    def returned(self) -> float:
        return self.finish_s if self.returned_s is None else self.returned_s

    @classmethod
    def of(cls, state: RequestState, instance: int = 0, returned_s: float | None = None,
           finish_reason: str | None = None) -> RequestResult:  # fmt: skip
        return cls(state.request.id, state.request.arrival_s, state.admitted_s, state.first_token_s, state.finish_s,
                   list(state.tokens), instance, state.logits, returned_s, state.preempted,
                   finish_reason or state.finish_reason)  # fmt: skip

    def as_json(self) -> dict:
        return {"id": self.id, "tokens": self.tokens, "arrival_s": self.arrival_s, "admitted_s": self.admitted_s,
                "first_token_s": self.first_token_s, "finish_s": self.finish_s,
                "finish_reason": self.finish_reason}  # fmt: skip
