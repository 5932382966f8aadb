"""The engine: one loop for every policy.

Each iteration:

1. requests that have arrived join the waiting queue (first come, first served);
2. the scheduler admits some of them into KV memory (the layout says whether they fit);
3. the scheduler's steps run: each is a list of lanes, one per request it
   computes (a prompt, a chunk of it, or one decode token), plus the idle
   lanes the layout computes for no one; the backend returns each lane's
   last logits, and every request whose ids are all cached samples a token;
4. finished (or cancelled) requests leave and free their memory;
5. the layout compacts memory (Flover's shuffle) and the backend moves the blocks.

A request that cannot grow its memory (paged layout, pool full) is
preempted: its memory is taken back, its tokens kept, and it goes back to
the front of the queue, to be recomputed when it is admitted again (vLLM's
recompute). Nothing is dropped: every request given to ``run`` finishes.

``run`` serves a list of timed requests; a server calls ``iterate`` with the
requests that arrived since the last iteration, and ``cancelled`` takes the
ids of requests whose clients went away (see ``flover.engine.live``).
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
                 keep_logits: bool = False, on_finish: Callable[[RequestResult], None] | None = None,
                 on_token: Callable[[RequestState], None] | None = None) -> None:  # fmt: skip
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
        self.on_token = on_token  # called after every sampled token (a server streams from it)
        self.stats = EngineStats()
        self.waiting: deque[RequestState] = deque()  # arrived, not in memory; first come, first served
        self.running: list[RequestState] = []  # in memory, in admission order
        self.cancelled: set[int | str] = set()  # ids to drop at the next iteration (any thread may add)
        self.done: list[RequestResult] = []
        self.unreturned: list[RequestResult] = []  # finished, held until the batch returns whole

    def run(self, requests: Sequence[Request]) -> list[RequestResult]:
        """Serve every request; results in the order they were handed back."""
        for request in requests:
            self.memory.check_fits(request)
        pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        while pending or self.waiting or self.running:
            now = self.clock.now()  # admit only what had arrived when the iteration began,
            arrived = []  # so prefills cannot starve the batch
            while pending and pending[0].arrival_s <= now:
                arrived.append(pending.popleft())
            if not self.iterate(arrived, now):
                self._idle(pending, now)
        return self.done

    def iterate(self, arrived: Sequence[Request], now: float) -> bool:
        """One iteration of the loop at time ``now``; False when nothing could run (the caller waits)."""
        self.waiting.extend(RequestState.start(r, self.keep_logits) for r in arrived)
        self._drop_cancelled()
        for state in self.scheduler.admit(self.waiting, self.running, self.memory, now) if self.waiting else ():
            self.waiting.remove(state)
            state.admitted_s = now if np.isnan(state.admitted_s) else state.admitted_s
            self.running.append(state)
        if not self.running:
            return False
        for work in self.scheduler.steps(self.running):
            self._compact()  # whoever left since the last step (a prompt's only token, a cancel) leaves no hole
            self._step(work, self.running, self.waiting)
        self._compact()
        if not self.running:
            self._return_batch()
        return True

    def wake_at(self, now: float) -> float | None:
        """When an idle engine wants to look again without a new arrival (dynamic batching's delay)."""
        return self.scheduler.wake_at(self.waiting, now) if self.waiting else None

    def _idle(self, pending: deque[Request], now: float) -> None:
        """Nothing runs: wait for the next arrival, or for the scheduler's own moment."""
        times = [t for t in (self.wake_at(now), pending[0].arrival_s if pending else None) if t is not None and t > now]
        if not times:
            raise RuntimeError(f"request {self.waiting[0].request.id!r} waits, nothing runs, and nothing will change")
        self.clock.wait_until(min(times))

    def _drop_cancelled(self) -> None:
        """Requests cancelled since the last iteration leave, free their memory and are handed back as cancelled."""
        if not self.cancelled:
            return
        for state in [s for s in self.waiting if s.request.id in self.cancelled]:
            self.waiting.remove(state)
            self.cancelled.discard(state.request.id)
            self._hand_back(RequestResult.of(state, finish_reason="cancelled"))
        for state in [s for s in self.running if s.request.id in self.cancelled]:
            self.running.remove(state)
            self.memory.release(state)
            self.cancelled.discard(state.request.id)
            self._hand_back(RequestResult.of(state, finish_reason="cancelled"))

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
            finished = state.accept(logits[row], now)
            if self.on_token:
                self.on_token(state)
            if finished:
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
            self.clock.spend_move(lengths)
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
