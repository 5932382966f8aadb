"""One accepted request as its handler sees it: events from the engine's thread, turned into text pieces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flover.engine import Request
from flover.server.text import TextStream


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A sampled token, sent from the engine's thread."""

    token: int
    done: bool
    finish_reason: str | None  # length or stop, once done
    logprob: float | None = None  # of the sampled token, when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # the likeliest tokens and their log probabilities


@dataclass(frozen=True, slots=True)
class Ended:
    """The engine gave the request back unfinished: ``cancelled`` (shutdown) or ``error`` (the engine failed)."""

    reason: str


@dataclass(slots=True)
class Piece:
    """What one chunk of the answer carries: new text, the token that made it, and the reason if it is the last."""

    text: str
    token: int
    finish_reason: str | None
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Interrupted(Exception):
    """The request ended without finishing (the server is stopping, or the engine failed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True, eq=False)
class Completion:
    request: Request
    text: TextStream
    logprobs: int | None  # how many likeliest tokens to report per token; None: no logprobs
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    done: bool = False  # the last piece was yielded: nothing to cancel
    outcome: str | None = None  # what metrics count it as when the engine hands it back cancelled: stop, error

    @property
    def id(self) -> str:
        return str(self.request.id)

    def deliver(self, event: TokenEvent | Ended) -> None:
        """From the engine's thread: queue the event on the handler's loop (if that loop still runs)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop closed: the server is gone, nobody is listening
            pass

    async def pieces(self, cancel) -> AsyncIterator[Piece]:
        """The answer piece by piece; ``cancel(id)`` stops the engine's work once a stop string has ended it."""
        while not self.done:
            event = await self.events.get()
            if isinstance(event, Ended):
                raise Interrupted(event.reason)
            self.generated += 1
            stop_token = event.finish_reason == "stop" and event.token in self.request.stop_ids
            text = "" if stop_token else self.text.add(event.token)  # a stop token is not shown, as a stop string
            reason = event.finish_reason
            if self.text.stopped:
                self.outcome, reason = "stop", "stop"  # the engine will say "cancelled": we cancelled it
                if not event.done:
                    cancel(self.request.id)
            elif event.done:
                text += self.text.finish()
            self.done = reason is not None
            yield Piece(text, event.token, reason, event.logprob, event.top)
