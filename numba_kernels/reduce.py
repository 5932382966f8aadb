"""Block-wide reductions in a fixed order, shared by layer norm and attention.

Each thread first folds its own strided elements (i = tid, tid + T, ...) in
ascending order and leaves the result in part[tid]; then thread 0 adds the T
partial results in thread order. The order depends on the number of elements
and the block size T only, never on which row or request the block serves, so
a row's result does not depend on its batch. No warp shuffles (the simulator
has none) and no tree: three barriers, and at most 256 serial adds, well under
a microsecond on a GPU.
"""

from __future__ import annotations

from numba import cuda

from numba_kernels.grid import block_threads

MAX_THREADS = 256  # size of the shared scratch a reducing block passes in


def reduce_threads(n: int) -> int:
    """Block size for reducing n values: a power of two from 32 to 256, fixed by n alone."""
    return block_threads(n, MAX_THREADS)


@cuda.jit(device=True)
def block_sum(part, value):  # pragma: no cover - kernel
    """Sum of every thread's ``value``, in thread order; part: shared [MAX_THREADS] scratch."""
    part[cuda.threadIdx.x] = value
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        total = part[0]
        for i in range(1, cuda.blockDim.x):
            total += part[i]
        part[0] = total
    cuda.syncthreads()
    total = part[0]
    cuda.syncthreads()  # the scratch is reused by the next reduction
    return total


@cuda.jit(device=True)
def block_max(part, value):  # pragma: no cover - kernel
    """Maximum of every thread's ``value`` (exact in any order)."""
    part[cuda.threadIdx.x] = value
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        best = part[0]
        for i in range(1, cuda.blockDim.x):
            best = max(best, part[i])
        part[0] = best
    cuda.syncthreads()
    best = part[0]
    cuda.syncthreads()
    return best
