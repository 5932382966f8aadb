"""Numba's CUDA simulator, fit for CI: one race closed, and a quicker pace for tests.

``guard_shared_arrays``: the simulator gives the threads of a block one static
shared array by remembering the first allocation made at each source line,
with a check-then-set that holds no lock. When the interpreter switches
threads between the check and the set, two threads of one block get different
arrays, and a kernel that is correct on a GPU computes garbage (here: about 1
launch in 200 at a 1 us switch interval). The replacement does the same under
a lock, keyed the same way by the caller's file and line. ``numba_kernels``
installs it on import when the simulator is on; it never touches a real GPU.

``quick_switching``: the simulator runs a block's threads as Python threads
and polls them at every barrier; at the default 5 ms GIL switch interval a
barrier costs milliseconds. Tests run inside a 0.1 ms interval.
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


@contextlib.contextmanager
def quick_switching(interval_s: float = 1e-4):
    """Let the simulator's threads trade the GIL every ``interval_s`` instead of every 5 ms."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
