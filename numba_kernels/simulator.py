"""Numba's CUDA simulator, fit for CI: one race closed, and a quicker pace for tests.

``guard_shared_arrays``: the simulator gives the threads of a block one static
shared array by remembering the first allocation made at each source line,
with a check-then-set that holds no lock. When the interpreter switches
threads between the check and the set, two threads of one block get different
arrays, and a kernel that is correct on a GPU computes garbage (here: about 1
launch in 200 at a 1 us switch interval). The replacement does the same under
a lock, keyed the same way by the caller's file and line. ``numba_kernels``
installs it on import when the simulator is on; it never touches a real GPU.

``quick_barriers``: the simulator runs a block's threads as Python threads,
and its block manager polls every thread in a loop that holds the GIL to
find when all have reached a barrier, so each barrier costs about a switch
interval per thread. The replacement counts arrivals under a condition
variable (the same rule: the barrier opens when every thread still running
has arrived) and the manager only joins the threads. Installed with
``guard_shared_arrays``; kernels, results and the real GPU are untouched.

``quick_switching``: at the default 5 ms GIL switch interval a thread that
computes holds the others back for milliseconds. Tests run inside a 0.1 ms
interval.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

_lock = threading.Lock()


def guard_shared_arrays() -> None:
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    if getattr(FakeCUDAShared.array, "guarded", False):
        return
    unguarded = FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory is one buffer: nothing to race on
            return unguarded(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _lock:
            found = self._allocations.get(key)
            if found is None:
                dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array.guarded = True
    FakeCUDAShared.array = array


class _Barrier:
    """syncthreads for one block: opens when every live thread has arrived; a thread that ends leaves it."""

    def __init__(self, threads: int) -> None:
        self.condition = threading.Condition()
        self.live = threads
        self.arrived = 0
        self.generation = 0

    def _open(self) -> None:
        self.arrived = 0
        self.generation += 1
        self.condition.notify_all()

    def wait(self) -> None:
        with self.condition:
            generation = self.generation
            self.arrived += 1
            if self.arrived == self.live:
                self._open()
            else:
                while generation == self.generation:
                    self.condition.wait()

    def leave(self) -> None:
        with self.condition:
            self.live -= 1
            if self.live and self.arrived == self.live:
                self._open()


def quick_barriers() -> None:
    from numba.cuda.simulator import kernel as sim

    if getattr(sim.BlockManager.run, "quick", False):
        return
    polling = sim.BlockThread.syncthreads

    def run(self, grid_point, *args):
        barrier = _Barrier(int(np.prod(self._block_dim)))
        threads = []
        for block_point in np.ndindex(*self._block_dim):

            def target():
                try:
                    self._f(*args)
                finally:
                    barrier.leave()

            thread = sim.BlockThread(target, self, grid_point, block_point, self._debug)
            thread.barrier = barrier
            threads.append(thread)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for thread in threads:
            if thread.exception:
                raise thread.exception[0].with_traceback(thread.exception[1])

    def syncthreads(self):
        barrier = getattr(self, "barrier", None)
        if barrier is None:
            return polling(self)
        barrier.wait()

    run.quick = True
    sim.BlockManager.run = run
    sim.BlockThread.syncthreads = syncthreads


@contextlib.contextmanager
def quick_switching(interval_s: float = 1e-4):
    """Let the simulator's threads trade the GIL every ``interval_s`` instead of every 5 ms."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
