"""Schedulers: what each iteration of the one engine loop admits and computes.

The engine loop (``flover.engine.loop``) is the same for every policy; a
scheduler answers two questions each iteration:

- ``admit``: which of the waiting requests to bring into KV memory now: it
  reserves their memory (``memory.admit``) and returns them (by default the
  longest waiting first, as many as fit: first come, first served);
- ``steps``: what to compute, as a sequence of steps, each a list of
  ``(request, tokens)``: the request's next ``tokens`` uncached ids (its
  whole prompt, a chunk of it, or the one token it sampled last).

Write your own by subclassing ``Scheduler``; for example, a fused scheduler
that decodes the oldest request first and prefills one newcomer per
iteration::

    class OnePrefillPerIteration(Scheduler):
        name = "one-prefill"

        def admit(self, waiting, running, memory, now):
            if waiting and memory.can_admit(waiting[0]):
                memory.admit(waiting[0])
                return [waiting[0]]
            return []

        def steps(self, running):
            for state in [s for s in running if s.uncached > 1]:
                yield [(state, state.uncached)]
            yield [(s, 1) for s in running if s.uncached == 1]

and check it with ``flover.testing.check_scheduler``, which runs the
fused-equals-serial properties on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from flover.engine.kv_layout import KVLayout
from flover.engine.request import RequestState

Work = list[tuple[RequestState, int]]  # one step: (request, how many of its uncached ids to feed)


class Scheduler:
    """The public interface: override ``admit``, ``steps`` or both (the defaults are Flover's)."""

    name = "scheduler"
    returns_whole_batch = False  # hand results back only when the running set empties (dynamic batching)

    def admit(self, waiting: Sequence[RequestState], running: Sequence[RequestState], memory: KVLayout,
              now: float) -> list[RequestState]:  # fmt: skip
        """Reserve memory for some of ``waiting`` (``memory.admit``) and return them.

        By default: from the front of the queue, as many as fit; the first
        that does not fit stops the rest, so nobody is overtaken.
        """
        admitted: list[RequestState] = []
        for state in waiting:
            if not (memory.can_admit(state) and self._room(running, len(admitted))):
                break
            memory.admit(state)  # reserved now, so the next one sees what is left
            admitted.append(state)
        return admitted

    def _room(self, running: Sequence[RequestState], n: int) -> bool:
        return True

    def steps(self, running: Sequence[RequestState]) -> Iterator[Work]:
        """The steps of one iteration; evaluated lazily, so a step sees the requests the one before left.
        By default Flover's: each newcomer's prompt alone, then one fused decode step."""
        return prefill_alone(running)

    def wake_at(self, waiting: Sequence[RequestState], now: float) -> float | None:
        """When to look again if nothing was admitted and nothing runs; None: at the next arrival."""
        return None


def prefill_alone(running: Sequence[RequestState]) -> Iterator[Work]:
    """Flover's iteration: each newcomer's prompt on its own, then one fused decode step for everyone."""
    for state in [s for s in running if s.uncached > 1]:
        yield [(state, state.uncached)]
    decodes = [(s, 1) for s in running if s.uncached == 1]
    if decodes:
        yield decodes


def prefill_chunked(running: Sequence[RequestState], chunk_tokens: int) -> Iterator[Work]:
    """One step of at most ``chunk_tokens`` tokens: every decode first, then prompt chunks in admission order."""
    work = [(s, 1) for s in running if s.uncached == 1]
    budget = chunk_tokens - len(work)
    for state in running:
        if state.uncached > 1 and budget > 0:
            n = min(state.uncached, budget)
            work.append((state, n))
            budget -= n
    if work:
        yield work


class FusedScheduler(Scheduler):
    """Temporal fusion: admit whatever memory holds, then one fused step for every request in flight."""

    name = "fused"

    def __init__(self, prefill: str = "alone", chunk_tokens: int = 256) -> None:
        if prefill not in ("alone", "chunked"):
            raise ValueError(f"prefill must be alone or chunked, got {prefill!r}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk-tokens must be >= 1, got {chunk_tokens}")
        self.prefill, self.chunk_tokens = prefill, chunk_tokens

    def steps(self, running: Sequence[RequestState]) -> Iterator[Work]:
        if self.prefill == "alone":
            return prefill_alone(running)
        return prefill_chunked(running, self.chunk_tokens)


class SerialScheduler(FusedScheduler):
    """One request at a time, to completion: the ground truth's schedule."""

    name = "serial"

    def _room(self, running: Sequence[RequestState], n: int) -> bool:
        return not running and n == 0


class DynamicScheduler(FusedScheduler):
    """Triton-style dynamic batching: a batch closes when it holds ``max_batch`` requests or
    ``queue_delay_s`` after its first arrival; it then runs until its longest member finishes
    (finished members are carried as padding by the layout), and newcomers wait for the next batch."""

    name = "dynamic"
    returns_whole_batch = True

    def __init__(self, max_batch: int, queue_delay_s: float) -> None:
        super().__init__("alone")
        self.max_batch, self.queue_delay_s = max_batch, queue_delay_s

    def admit(self, waiting, running, memory, now) -> list[RequestState]:
        if running or not waiting:
            return []
        if len(waiting) < self.max_batch and now < waiting[0].request.arrival_s + self.queue_delay_s:
            return []  # the batch is still open
        return super().admit(waiting, running, memory, now)

    def _room(self, running: Sequence[RequestState], n: int) -> bool:
        return n < self.max_batch

    def wake_at(self, waiting: Sequence[RequestState], now: float) -> float | None:
        return waiting[0].request.arrival_s + self.queue_delay_s if waiting else None
