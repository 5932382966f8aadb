"""Concurrent model instances: N engines, each with its own copy of the model, serving in turn.

Each instance runs the serial scheduler; a router sends each request, as it
arrives, to the instance with the fewest outstanding requests. On the wall
clock the instances are processes, each with its own weights and its share
of the cores, as Triton's instances are separate execution contexts; on a
virtual clock they are simulated one after another on forked clocks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from flover.clock import VirtualClock, WallClock
from flover.engine.kv_layout import SlotLayout
from flover.engine.loop import Engine
from flover.engine.records import EngineStats
from flover.engine.request import Request, RequestResult
from flover.engine.scheduler import SerialScheduler
from reference.backend import Backend

Finish = Callable[[RequestResult], None] | None


def serial_engine(backend: Backend, clock, keep_logits: bool) -> Engine:
    return Engine(backend, SerialScheduler(), SlotLayout(backend.config, 1), clock, keep_logits)


Served = tuple[list[RequestResult], EngineStats]


def simulate_instances(backends: Sequence[Backend], requests: Sequence[Request], clock: VirtualClock,
                       keep_logits: bool = False, on_finish: Finish = None) -> Served:  # fmt: skip
    """The instances on one virtual clock: each request on its instance's own clock, from when it is free."""
    finishes: list[list[float]] = [[] for _ in backends]  # finish times of each instance's requests
    done, stats = [], EngineStats()
    for request in sorted(requests, key=lambda r: r.arrival_s):
        outstanding = [sum(f > request.arrival_s for f in fs) for fs in finishes]
        i = int(np.argmin(outstanding))
        engine = serial_engine(backends[i], clock.fork(max([request.arrival_s, *finishes[i]])), keep_logits)
        (result,) = engine.run([request])
        stats.steps += engine.stats.steps
        finishes[i].append(result.finish_s)
        done.append(_on_instance(result, i))
    done.sort(key=lambda r: r.finish_s)
    for r in done if on_finish else ():
        on_finish(r)
    return done, stats


def _on_instance(result: RequestResult, i: int) -> RequestResult:
    return RequestResult(**{**{f: getattr(result, f) for f in result.__slots__}, "instance": i})


def _instance_main(i: int, make_backend, threads: int, keep_logits: bool, inbox, outbox) -> None:
    """One instance process: build its own backend, say ready, then serve what the router sends until None."""
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        backend = make_backend(1)
        backend.threads = threads
        from flover.runner import warm_up

        warm_up(backend)
        outbox.put(("ready", i, None))
        while (message := inbox.get()) is not None:
            request, start = message
            engine = serial_engine(backend, WallClock(start), keep_logits)
            (result,) = engine.run([request])
            outbox.put(("done", i, (result, engine.stats.steps)))
    except BaseException:  # reported to the router, which raises it
        outbox.put(("error", i, traceback.format_exc()))


class InstanceProcesses:
    """N instance processes on the wall clock, started (weights built, kernels warm) before the clock starts."""

    def __init__(self, make_backend, n: int, keep_logits: bool = False, threads: int | None = None) -> None:
        context = mp.get_context("spawn")  # a fresh interpreter: no OpenMP threads inherited across a fork
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.outbox = context.Queue()
        self.inboxes = [context.Queue() for _ in range(n)]
        self.processes = [
            context.Process(target=_instance_main, args=(i, make_backend, self.threads, keep_logits, inbox, self.outbox),
                            daemon=True)
            for i, inbox in enumerate(self.inboxes)
        ]  # fmt: skip
        for p in self.processes:
            p.start()
        ready = 0
        while ready < n:
            kind, _, _ = self._next(timeout=None)
            ready += kind == "ready"

    def _next(self, timeout: float | None):
        """The next message from an instance; raises if one failed or died."""
        while True:
            try:
                kind, i, body = self.outbox.get(timeout=0.5 if timeout is None else timeout)
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"a model instance process died (exit code {dead[0]})") from None
                if timeout is not None:
                    return None, None, None
                continue
            if kind == "error":
                self.close()
                raise RuntimeError(f"model instance {i} failed:\n{body}")
            return kind, i, body

    def run(self, requests: Sequence[Request], clock: WallClock,
            on_finish: Finish = None) -> Served:  # fmt: skip
        outstanding = [0] * len(self.processes)
        done, stats = [], EngineStats()

        def receive(timeout: float | None) -> bool:
            kind, i, body = self._next(timeout)
            if kind == "done":
                result, steps = body
                outstanding[i] -= 1
                stats.steps.extend(steps)
                done.append(_on_instance(result, i))
                if on_finish:
                    on_finish(done[-1])
            return kind is not None

        for request in sorted(requests, key=lambda r: r.arrival_s):
            while (wait := request.arrival_s - clock.now()) > 0:
                receive(timeout=min(wait, 0.05))  # results keep the router's counts current while it waits
            while receive(timeout=0.001):
                pass
            i = int(np.argmin(outstanding))
            outstanding[i] += 1
            self.inboxes[i].put((request, clock.start))
        while len(done) < len(requests):
            receive(timeout=None)
        return done, stats

    def close(self) -> None:
        for inbox, p in zip(self.inboxes, self.processes):
            if p.is_alive():
                inbox.put(None)
        for p in self.processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
