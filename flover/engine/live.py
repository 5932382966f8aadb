"""The engine as a service: requests join and leave while the loop runs in its own thread.

``LiveEngine`` owns an ``Engine`` and a thread that runs its iterations.
Other threads (a web server's handlers) call ``submit`` with a request,
which is stamped with its arrival time on the engine's clock, and
``cancel`` with an id when its client goes away; the request then leaves at
the next iteration and frees its memory. Tokens and results come back
through the engine's ``on_token`` and ``on_finish`` callbacks, called on the
engine's thread. The numerics never leave that thread, so what a client
receives is bitwise what ``Engine.run`` computes.

A live engine may run for weeks, so it keeps no history: after each
iteration the steps it ran go to ``on_steps`` (a server's metrics) and the
results already handed to ``on_finish`` are dropped. If the loop fails,
``on_error`` hears of it (a server answers its open requests), and
``error`` keeps the exception.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import replace

from flover.engine.loop import Engine
from flover.engine.records import Step
from flover.engine.request import Request

IDLE_POLL_S = 0.05  # how long an idle loop sleeps before it checks for a stop


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the request was not accepted."""


class LiveEngine:
    """Run ``engine`` on a thread of its own; at most ``max_waiting`` requests wait for memory (None: no bound)."""

    def __init__(self, engine: Engine, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max-waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.on_steps: Callable[[list[Step]], None] | None = None  # called on the engine's thread
        self.on_error: Callable[[BaseException], None] | None = None
        self._lock = threading.Lock()  # submit's bound check and enqueue are one step
        self._thread = threading.Thread(target=self._loop, name="flover-engine", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + self.inbox.qsize()

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def start(self) -> LiveEngine:
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queue ``request`` as arriving now; -> it, stamped. Raises QueueFull at the bound, ValueError
        if it could never fit in memory, RuntimeError once stopping."""
        if self.stopping.is_set() or self.error is not None:
            raise RuntimeError("the engine is shutting down" if self.error is None else f"the engine failed: {self.error}")
        self.engine.memory.check_fits(request)
        with self._lock:
            if self.max_waiting is not None and self.waiting >= self.max_waiting:
                raise QueueFull(f"{self.waiting} requests are waiting, the bound --max-waiting is {self.max_waiting}")
            stamped = replace(request, arrival_s=self.engine.clock.now())
            self.inbox.put(stamped)
        return stamped

    def cancel(self, request_id: int | str) -> None:
        self.engine.cancelled.add(request_id)

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting new requests, finish what was accepted, and join the loop."""
        self.stopping.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        engine, arrived = self.engine, []
        try:
            while not (self.stopping.is_set() and not arrived and self.inbox.empty() and not engine.waiting
                       and not engine.running):  # fmt: skip
                while not self.inbox.empty():
                    arrived.append(self.inbox.get())
                now = engine.clock.now()
                ran, arrived = engine.iterate(arrived, now), []
                self._forget(engine)
                if ran:
                    continue
                wake = engine.wake_at(now)
                try:  # idle: sleep until a request arrives, the scheduler's moment, or a stop check
                    timeout = IDLE_POLL_S if wake is None else min(IDLE_POLL_S, max(wake - now, 0.0))
                    arrived.append(self.inbox.get(timeout=timeout))  # first of the next iteration's arrivals
                except queue.Empty:
                    pass
        except BaseException as error:  # reported to submitters; the server answers 500 and stays up
            self.error = error
            if self.on_error is not None:
                self.on_error(error)
            raise

    def _forget(self, engine: Engine) -> None:
        """Hand the iteration's steps to ``on_steps`` and drop them and the handed-back results."""
        steps, engine.stats.steps = engine.stats.steps, []
        if self.on_steps is not None and steps:
            self.on_steps(steps)
        engine.done.clear()
