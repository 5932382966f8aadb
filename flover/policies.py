"""The baselines temporal fusion is measured against, on the same backend.

- ``serial``: first come first served, one request at a time to completion.
- ``dynamic``: Triton-style dynamic batching. A batch closes when it holds
  ``max_batch`` requests or ``window_s`` after its first request arrived; it
  then runs until its longest member finishes, finished members carried along
  as padding; requests arriving meanwhile wait for the next batch.
- ``instances``: N model instances serving concurrently, each serially; a
  request goes to the instance with the fewest outstanding requests.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np

from flover.clock import VirtualClock, WallClock
from flover.engine import EngineStats, Step
from flover.request import Request, RequestResult, Sequence
from reference.backend import Backend

Finish = Callable[[RequestResult], None] | None


def serve_one(backend: Backend, seq: Sequence, clock, slot: int = 0, stats: EngineStats | None = None) -> None:
    """Prefill then decode one request alone at batch size 1."""
    seq.admitted_s = clock.now()
    logits = backend.prefill(slot, np.asarray(seq.request.prompt_ids, np.int64))
    clock.spend("prefill")
    finished = seq.accept(logits, clock.now())
    while not finished:
        start = clock.now()
        logits = backend.decode(np.array([slot]), np.array([seq.tokens[-1]]), np.array([seq.position]))
        clock.spend("decode")
        if stats is not None:
            stats.steps.append(Step(start, clock.now(), 1, 1))
        seq.advance()
        finished = seq.accept(logits[0], clock.now())


def run_serial(backend: Backend, requests: Seq[Request], clock=None, keep_logits: bool = False,
               on_finish: Finish = None, stats: EngineStats | None = None) -> list[RequestResult]:  # fmt: skip
    clock = clock or WallClock()
    done = []
    for request in sorted(requests, key=lambda r: r.arrival_s):
        clock.wait_until(request.arrival_s)
        seq = Sequence.start(request, keep_logits)
        serve_one(backend, seq, clock, stats=stats)
        done.append(RequestResult.of(seq))
        if on_finish:
            on_finish(done[-1])
    return done


def run_dynamic(backend: Backend, requests: Seq[Request], max_batch: int, window_s: float, clock=None,
                keep_logits: bool = False, on_finish: Finish = None, stats: EngineStats | None = None
                ) -> list[RequestResult]:  # fmt: skip
    if max_batch > backend.n_slots:
        raise ValueError(f"max_batch {max_batch} exceeds the backend's {backend.n_slots} KV slots")
    clock = clock or WallClock()
    pending = sorted(requests, key=lambda r: r.arrival_s)
    done: list[RequestResult] = []
    while pending:
        clock.wait_until(pending[0].arrival_s)
        closes = pending[0].arrival_s + window_s
        if len(pending) >= max_batch:
            closes = min(closes, pending[max_batch - 1].arrival_s)
        clock.wait_until(closes)
        arrived = [r for r in pending[:max_batch] if r.arrival_s <= clock.now()]
        pending = pending[len(arrived):]
        done.extend(_run_batch(backend, arrived, clock, keep_logits, on_finish, stats))
    return done


def _run_batch(backend, batch, clock, keep_logits, on_finish, stats) -> list[RequestResult]:
    seqs = [Sequence.start(r, keep_logits) for r in batch]
    finished = []
    for slot, seq in enumerate(seqs):
        seq.admitted_s = clock.now()
        logits = backend.prefill(slot, np.asarray(seq.request.prompt_ids, np.int64))
        clock.spend("prefill")
        finished.append(seq.accept(logits, clock.now()))
    slots = np.arange(len(seqs))
    while not all(finished):
        # finished members stay in the batch as padding, re-fed at their last position
        tokens = np.array([seq.tokens[-1] for seq in seqs])
        positions = np.array([seq.position for seq in seqs])
        start = clock.now()
        logits = backend.decode(slots, tokens, positions)
        clock.spend("decode")
        if stats is not None:
            stats.steps.append(Step(start, clock.now(), finished.count(False), len(seqs)))
        for row, seq in enumerate(seqs):
            if not finished[row]:
                seq.advance()
                finished[row] = seq.accept(logits[row], clock.now())
    # A member's finish_s is its own last token (as if streamed); without streaming,
    # Triton hands the whole batch back when its longest member is done.
    results = [RequestResult.of(seq, returned_s=clock.now()) for seq in seqs]
    for r in sorted(results, key=lambda r: r.finish_s) if on_finish else ():
        on_finish(r)
    return results


def run_instances(backends: Seq[Backend], requests: Seq[Request], clock=None, keep_logits: bool = False,
                  on_finish: Finish = None, stats: EngineStats | None = None) -> list[RequestResult]:  # fmt: skip
    """Concurrent instances: real threads on a wall clock, simulated in turn on a virtual one."""
    clock = clock or WallClock()
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    if isinstance(clock, VirtualClock):
        return _simulate_instances(backends, ordered, clock, keep_logits, on_finish, stats)
    return _threaded_instances(backends, ordered, clock, keep_logits, on_finish, stats)


def _simulate_instances(backends, ordered, clock, keep_logits, on_finish, stats):
    finishes: list[list[float]] = [[] for _ in backends]  # finish times of each instance's requests
    done = []
    for request in ordered:
        outstanding = [sum(f > request.arrival_s for f in fs) for fs in finishes]
        i = int(np.argmin(outstanding))
        own = clock.fork(max([request.arrival_s, *finishes[i]]))
        seq = Sequence.start(request, keep_logits)
        serve_one(backends[i], seq, own, stats=stats)
        finishes[i].append(seq.finish_s)
        done.append(RequestResult.of(seq, instance=i))
    done.sort(key=lambda r: r.finish_s)
    for r in done if on_finish else ():
        on_finish(r)
    return done


def _threaded_instances(backends, ordered, clock: WallClock, keep_logits, on_finish, stats):
    for backend in backends:  # N copies share the cores, as N pinned instances would
        if hasattr(backend, "threads"):
            backend.threads = max(1, (os.cpu_count() or 1) // len(backends))
    queues: list[list[Request]] = [[] for _ in backends]
    outstanding = [0] * len(backends)
    lock = threading.Condition()
    closed = False
    done: list[RequestResult] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            while True:
                with lock:
                    lock.wait_for(lambda: queues[i] or closed)
                    if not queues[i]:
                        return
                    request = queues[i].pop(0)
                seq = Sequence.start(request, keep_logits)
                serve_one(backends[i], seq, clock, stats=stats)
                with lock:
                    outstanding[i] -= 1
                    done.append(RequestResult.of(seq, instance=i))
                    if on_finish:
                        on_finish(done[-1])
        except BaseException as error:  # surfaced in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(backends))]
    for t in threads:
        t.start()
    for request in ordered:
        clock.wait_until(request.arrival_s)
        with lock:
            i = int(np.argmin(outstanding))
            outstanding[i] += 1
            queues[i].append(request)
            lock.notify_all()
    with lock:
        closed = True
        lock.notify_all()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done
