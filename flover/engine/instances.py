"""Concurrent model instances: N engines, each with its own copy of the model, serving in turn.

Each instance runs the serial scheduler; a router sends each request, as it
arrives, to the instance with the fewest outstanding requests. On the wall
clock the instances are processes, each with its own weights and its share
of the cores, as Triton's instances are separate execution contexts; on a
virtual clock they are simulated one after another on forked clocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Pipe, wait

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
            while (wait_s := request.arrival_s - clock.now()) > 0:
                receive(timeout=min(wait_s, 0.05))  # results keep the router's counts current while it waits
            while receive(timeout=0):
                pass
            i = int(np.argmin(outstanding))
            outstanding[i] += 1
            self.conns[i].send((request, clock.start))
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
