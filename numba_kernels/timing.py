"""Timing kernels on a GPU, without Python's launch overhead.

Launching a Numba kernel costs tens of microseconds on the host, longer than
a decode GEMV of the GPT-2 124M shape runs on the GPU. So ``gpu_time_ms``
first queues a kernel that holds the GPU (it sleeps), records an event,
queues the launches and records another event. The launches pile up behind
the holding kernel and then run back to back, so the two events time the
kernels alone. ``host_time_ms`` is the other number: one call as Python
sees it, launch overhead and all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from numba import cuda, uint32

SLEEP_NS = 1000


@cuda.jit
def hold_kernel(microseconds):  # pragma: no cover - kernel
    """Keep the GPU busy for about ``microseconds``."""
    for _ in range(microseconds):
        cuda.nanosleep(uint32(SLEEP_NS))


def host_time_ms(call: Callable[..., object], *args, reps: int = 5) -> float:
    """Wall time of one synchronous ``call(*args)``, launch overhead included (median of ``reps``)."""
    call(*args)
    cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call(*args)
        cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def gpu_time_ms(launch: Callable[..., object], *args, reps: int = 20) -> float:
    """GPU time of one ``launch(*args)`` (which may launch several kernels), averaged over ``reps``.

    ``launch`` must not synchronize (no copy to the host), or it would wait for the holding kernel.
    """
    launch(*args)  # compile and warm up
    cuda.synchronize()
    start = time.perf_counter()
    launch(*args)
    queue_ms = 1e3 * (time.perf_counter() - start)  # host time to queue one launch
    cuda.synchronize()
    begin, end = cuda.event(), cuda.event()
    hold_kernel[1, 1](int(1e3 * max(2.0, 3 * reps * queue_ms)))
    begin.record()
    for _ in range(reps):
        launch(*args)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps
