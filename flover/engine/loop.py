"""Temporal fusion: requests that arrive at different times share one fused decode step.

Each iteration: admit the requests that have arrived into free KV slots (the
rest wait, first come first served; nothing is dropped), prefill each newcomer
on its own, run one fused decode step over the window of active slots, sample
per request, evict the finished, and shuffle memory when a hole opens inside
the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from flover.clock import WallClock
from flover.request import Request, RequestResult, Sequence
from flover.shuffle import choose_slot, has_hole, shuffle_plan, window
from reference.backend import Backend


@dataclass(frozen=True, slots=True)
class Step:
    """One fused decode step: when it ran, how many requests it served, how many slots it computed."""

    start_s: float
    end_s: float
    batch: int
    width: int


@dataclass(slots=True)
class EngineStats:
    steps: list[Step] = field(default_factory=list)
    moves: int = 0  # slot moves made by the memory shuffle
    max_active: int = 0


class FusionEngine:
    """The fused policy over the first ``capacity`` KV slots of a backend (all of them by default)."""

    def __init__(self, backend: Backend, clock=None, shuffle: bool = True, keep_logits: bool = False,
                 on_finish: Callable[[RequestResult], None] | None = None, capacity: int | None = None) -> None:  # fmt: skip
        capacity = backend.n_slots if capacity is None else capacity
        if not 1 <= capacity <= backend.n_slots:
            raise ValueError(f"slots must be between 1 and the backend's {backend.n_slots}, got {capacity}")
        self.backend = backend
        self.clock = clock or WallClock()
        self.shuffle = shuffle
        self.keep_logits = keep_logits
        self.on_finish = on_finish
        self.slots: list[Sequence | None] = [None] * capacity
        self.stats = EngineStats()

    @property
    def active(self) -> list[bool]:
        return [s is not None for s in self.slots]

    def run(self, requests: Seq[Request]) -> list[RequestResult]:
        """Serve every request; results in the order the requests finished."""
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        done: list[RequestResult] = []
        while pending or any(self.active):
            if not any(self.active) and pending:
                self.clock.wait_until(pending[0].arrival_s)
            now = self.clock.now()  # admit only what had arrived when the iteration began,
            while pending and pending[0].arrival_s <= now and not all(self.active):  # so prefills cannot starve the batch
                self._admit(pending.popleft(), done)
            if any(self.active):
                self._fused_step(done)
        return done

    def _admit(self, request: Request, done: list[RequestResult]) -> None:
        slot = choose_slot(self.active)
        seq = Sequence.start(request, self.keep_logits)
        seq.admitted_s = self.clock.now()
        logits = self.backend.prefill(slot, np.asarray(request.prompt_ids, np.int64))
        self.clock.spend("prefill")
        if seq.accept(logits, self.clock.now()):
            self._finish(seq, done)
        else:
            self.slots[slot] = seq
            self.stats.max_active = max(self.stats.max_active, sum(self.active))

    def _fused_step(self, done: list[RequestResult]) -> None:
        first, last = window(self.active)
        if self.shuffle:
            lanes = [i for i in range(first, last) if self.slots[i] is not None]
        else:  # compute over the holes too, as a fused kernel over the whole window would
            lanes = list(range(first, last))
        live = [self.slots[i] for i in lanes]
        tokens = [seq.tokens[-1] if seq else 0 for seq in live]
        positions = [seq.position if seq else 0 for seq in live]
        start = self.clock.now()
        logits = self.backend.decode(np.array(lanes), np.array(tokens), np.array(positions))
        self.clock.spend("decode")
        now = self.clock.now()
        self.stats.steps.append(Step(start, now, sum(seq is not None for seq in live), len(lanes)))
        for row, (slot, seq) in enumerate(zip(lanes, live)):
            if seq is None:
                continue
            seq.advance()
            if seq.accept(logits[row], now):
                self.slots[slot] = None
                self._finish(seq, done)
        if self.shuffle and has_hole(self.active):
            self._shuffle()

    def _shuffle(self) -> None:
        plan = shuffle_plan(self.active)
        src = np.array([s for s, _ in plan])
        dst = np.array([d for _, d in plan])
        lengths = np.array([self.slots[s].position for s in src])
        self.backend.move_slots(src, dst, lengths)
        for s, d in plan:
            self.slots[d], self.slots[s] = self.slots[s], None
        self.stats.moves += len(plan)

    def _finish(self, seq: Sequence, done: list[RequestResult]) -> None:
        result = RequestResult.of(seq)
        done.append(result)
        if self.on_finish:
            self.on_finish(result)
