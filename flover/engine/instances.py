"""Concurrent model instances: N engines, each with its own copy of the model, serving in turn.

Each instance runs the serial scheduler. Requests wait in one queue, first
come first served, and the first instance to be free takes the next one, as
Triton's default scheduler hands requests to the instances of a model's
instance group: with N instances busy, request N+1 waits for one of them to
finish. No instance idles while a request waits. On the wall clock the
instances are processes, each with its own weights and its share of the
cores, as Triton's instances are separate execution contexts; on a virtual
clock each runs on a forked clock of its own, as if on a device of its own
(``flover.sim.instances`` shares one device between them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Pipe, wait

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
    """The instances on one virtual clock: each request, in arrival order, on the first instance free, on its own
    forked clock from when both it and the instance are there."""
    free_at = [clock.now()] * len(backends)  # when each instance finishes the requests it has taken
    done, stats = [], EngineStats()
    for request in sorted(requests, key=lambda r: r.arrival_s):
        i = min(range(len(backends)), key=lambda i: (max(free_at[i], request.arrival_s), i))
        engine = serial_engine(backends[i], clock.fork(max(free_at[i], request.arrival_s)), keep_logits)
        (result,) = engine.run([request])
        stats.steps += engine.stats.steps
        free_at[i] = result.finish_s
        done.append(_on_instance(result, i))
    done.sort(key=lambda r: r.finish_s)
    for r in done if on_finish else ():
        on_finish(r)
    return done, stats


def _on_instance(result: RequestResult, i: int) -> RequestResult:
    return RequestResult(**{**{f: getattr(result, f) for f in result.__slots__}, "instance": i})


class InstanceProcesses:
    """N instance processes on the wall clock, started (weights built, kernels warm) before the clock starts.

    Each is a fresh interpreter (``python -m flover.engine.instance_worker FD``) that
    talks to the router over a pipe: no OpenMP threads are inherited across a
    fork, and, unlike multiprocessing's spawn, the caller's script is not run
    again in the child, so a plain script or a lesson may use instances too.
    """

    def __init__(self, make_backend, n: int, keep_logits: bool = False, threads: int | None = None) -> None:
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.conns, self.processes = [], []
        env = {**os.environ, "NUMBA_NUM_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads)}
        for _ in range(n):
            ours, theirs = Pipe()
            self.processes.append(subprocess.Popen([sys.executable, "-m", "flover.engine.instance_worker", str(theirs.fileno())],
                                                   pass_fds=[theirs.fileno()], env=env))  # fmt: skip
            theirs.close()
            self.conns.append(ours)
        try:
            for conn in self.conns:
                conn.send((make_backend, self.threads, keep_logits))
            for _ in range(n):
                while self._next(timeout=None)[0] != "ready":
                    pass
        except BaseException:
            self.close()
            raise

    def _next(self, timeout: float | None):
        """(kind, instance, body) of the next message from any instance, or (None, None, None) after ``timeout``;
        raises if an instance failed or died."""
        for conn in wait(self.conns, timeout):
            i = self.conns.index(conn)
            try:
                kind, body = conn.recv()
            except EOFError:
                code = self.processes[i].wait()
                self.close()
                raise RuntimeError(f"model instance {i} exited (code {code}) before it finished its requests") from None
            if kind == "error":
                self.close()
                raise RuntimeError(f"model instance {i} failed:\n{body}")
            return kind, i, body
        return None, None, None

    def run(self, requests: Sequence[Request], clock: WallClock,
            on_finish: Finish = None) -> Served:  # fmt: skip
        queue: deque[Request] = deque()  # arrived, waiting for an instance
        busy = [False] * len(self.processes)
        done, stats = [], EngineStats()

        def dispatch() -> None:
            while queue and not all(busy):
                i = busy.index(False)
                busy[i] = True
                self.conns[i].send((queue.popleft(), clock.start))

        def receive(timeout: float | None) -> bool:
            kind, i, body = self._next(timeout)
            if kind == "done":
                result, steps = body
                busy[i] = False
                dispatch()  # the next waiting request, before anything else
                stats.steps.extend(steps)
                done.append(_on_instance(result, i))
                if on_finish:
                    on_finish(done[-1])
            return kind is not None

        for request in sorted(requests, key=lambda r: r.arrival_s):
            while (wait_s := request.arrival_s - clock.now()) > 0:
                receive(timeout=wait_s)  # an instance that finishes meanwhile takes the next waiting request
            queue.append(request)
            dispatch()
        while len(done) < len(requests):
            receive(timeout=None)
        return done, stats

    def close(self) -> None:
        for conn, p in zip(self.conns, self.processes):
            if p.poll() is None:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for conn, p in zip(self.conns, self.processes):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            conn.close()
