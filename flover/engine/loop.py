"""The engine: one loop for every policy.

Each iteration:

1. requests that have arrived join the waiting queue (first come, first served);
2. the scheduler admits some of them into KV memory (the layout says whether they fit);
3. the scheduler's steps run: each is a list of lanes, one per request it
   computes (a prompt, a chunk of it, or one decode token), plus the idle
   lanes the layout computes for no one; the backend returns each lane's
   last logits, and every request whose ids are all cached samples a token;
4. finished requests leave and free their memory;
5. the layout compacts memory (Flover's shuffle) and the backend moves the blocks.

A request that cannot grow its memory (paged layout, pool full) is
preempted: its memory is taken back, its tokens kept, and it goes back to
the front of the queue, to be recomputed when it is admitted again (vLLM's
recompute). Nothing is dropped: every request given to ``run`` finishes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from flover.clock import WallClock
from flover.engine.kv_layout import KVLayout
from flover.engine.records import EngineStats, Step
from flover.engine.request import Request, RequestResult, RequestState
from flover.engine.scheduler import Scheduler, Work
from reference import Lane
from reference.backend import Backend


class Engine:
    """Serve requests on ``backend`` under ``scheduler``, with KV memory laid out by ``memory``."""

    def __init__(self, backend: Backend, scheduler: Scheduler, memory: KVLayout, clock=None,
                 keep_logits: bool = False, on_finish: Callable[[RequestResult], None] | None = None) -> None:  # fmt: skip
        have, need = backend.kv, memory.shape
        if have.block_size != need.block_size or have.n_blocks < need.n_blocks:
            raise ValueError(f"the layout needs {need.n_blocks} blocks of {need.block_size} positions; the backend "
                             f"has {have.n_blocks} of {have.block_size}")  # fmt: skip
        self.backend = backend
        self.scheduler = scheduler
        self.memory = memory
        self.clock = clock or WallClock()
        self.keep_logits = keep_logits
        self.on_finish = on_finish
        self.stats = EngineStats()
        self.done: list[RequestResult] = []
        self.unreturned: list[RequestResult] = []  # finished, held until the batch returns whole

    def run(self, requests: Sequence[Request]) -> list[RequestResult]:
        """Serve every request; results in the order they were handed back."""
        for request in requests:
            self.memory.check_fits(request)
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        waiting: deque[RequestState] = deque()
        running: list[RequestState] = []
        while pending or waiting or running:
            now = self.clock.now()  # admit only what had arrived when the iteration began,
            while pending and pending[0].arrival_s <= now:  # so prefills cannot starve the batch
                waiting.append(RequestState.start(pending.popleft(), self.keep_logits))
            for _ in range(self.scheduler.admit(waiting, running, self.memory, now) if waiting else 0):
                state = waiting.popleft()
                state.admitted_s = now if np.isnan(state.admitted_s) else state.admitted_s
                running.append(state)
            if not running:
                self._idle(pending, waiting, now)
                continue
            for work in self.scheduler.steps(running):
                self._step(work, running, waiting)
            self._compact()
            if not running:
                self._return_batch()
        return self.done

    def _idle(self, pending: deque[Request], waiting: deque[RequestState], now: float) -> None:
        """Nothing runs: wait for the next arrival, or for the scheduler's own moment."""
        times = [t for t in (self.scheduler.wake_at(waiting, now), pending[0].arrival_s if pending else None)
                 if t is not None and t > now]  # fmt: skip
        if not times:
            raise RuntimeError(f"request {waiting[0].request.id!r} waits, nothing runs, and nothing will change")
        self.clock.wait_until(min(times))

    def _step(self, work: Work, running: list[RequestState], waiting: deque[RequestState]) -> None:
        granted = self._grow(work, running, waiting)
        if not granted:
            return
        lanes = [Lane.of(self.memory.blocks(s), s.ids[s.cached : s.cached + n], s.cached) for s, n in granted]
        decodes = sum(n == 1 and s.generated > 0 and s.uncached == 1 for s, n in granted)
        idle = self.memory.idle_lanes() if decodes else []
        start = self.clock.now()
        logits = self.backend.step(lanes + idle)
        self.clock.spend(lanes + idle, prefill=len(granted) - decodes)
        now = self.clock.now()
        rows = sum(n for _, n in granted)
        held = self.memory.held_bytes()
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, held)
        self.stats.steps.append(Step(start, now, len(granted), rows + len(idle), len(idle),
                                     rows - decodes, held))  # fmt: skip
        for row, (state, n) in enumerate(granted):
            state.cached += n
            if state.uncached:  # a chunk short of the prompt's end: its logits are not used
                continue
            if state.accept(logits[row], now):
                running.remove(state)
                self.memory.release(state)
                self._finish(state)

    def _grow(self, work: Work, running: list[RequestState], waiting: deque[RequestState]) -> Work:
        """Memory for every lane of the step; when the pool runs out, preempt the latest admitted."""
        granted: Work = []
        for state, n in work:
            while state in running and not self.memory.grow(state, n):
                self._preempt(running[-1], running, waiting)
            if state in running:
                granted.append((state, n))
        return [(s, n) for s, n in granted if s in running]

    def _preempt(self, state: RequestState, running: list[RequestState], waiting: deque[RequestState]) -> None:
        running.remove(state)
        self.memory.release(state)
        state.cached = 0
        state.preempted += 1
        waiting.appendleft(state)
        self.stats.preemptions += 1

    def _compact(self) -> None:
        moves = self.memory.compact()
        if moves:
            src, dst, lengths = (np.array(column, np.int64) for column in zip(*moves))
            self.backend.move(src, dst, lengths)
            self.stats.moves += len(moves)

    def _finish(self, state: RequestState) -> None:
        result = RequestResult.of(state)
        if self.scheduler.returns_whole_batch:
            self.unreturned.append(result)
        else:
            self._hand_back(result)

    def _return_batch(self) -> None:
        """A batch that returns whole is handed back when its last member finishes."""
        now = self.clock.now()
        for result in sorted(self.unreturned, key=lambda r: r.finish_s):
            self._hand_back(RequestResult(**{**{f: getattr(result, f) for f in result.__slots__}, "returned_s": now}))
        self.unreturned.clear()

    def _hand_back(self, result: RequestResult) -> None:
        self.done.append(result)
        if self.on_finish:
            self.on_finish(result)
