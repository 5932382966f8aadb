"""Block-wide reductions in a fixed order, shared by layer norm and attention.

Version 1 (``block_sum``, ``block_max``): each thread first folds its own
strided elements (i = tid, tid + T, ...) in ascending order and leaves the
result in part[tid]; then thread 0 adds the T partial results in thread
order: three barriers and up to 256 dependent adds (about 0.5 us on a GPU).

Version 2 (``tree_sum``, ``tree_max``): the values already in a shared
array of SIZE (a power of two) are halved SIZE / 2, SIZE / 4, ... 1 times,
element t + stride added into t (by thread t, or t mod the block size when
the block is smaller): log2(SIZE) levels.

Either order depends on the number of elements and the block size only,
never on which row or request the block serves, so a row's result does not
depend on its batch. No warp shuffles: the simulator has none.
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


@cuda.jit(device=True)
def tree_sum(values, size):  # pragma: no cover - kernel
    """Sum of values[0 .. size-1] (shared, size a power of two) into values[0], in a fixed tree; -> the sum.

    Every thread of the block calls it; values is clobbered."""
    tid = cuda.threadIdx.x
    stride = size // 2
    while stride > 0:
        cuda.syncthreads()
        for i in range(tid, stride, cuda.blockDim.x):
            values[i] = values[i] + values[i + stride]
        stride //= 2
    cuda.syncthreads()
    total = values[0]
    cuda.syncthreads()  # values may be reused next
    return total


@cuda.jit(device=True)
def tree_max(values, size):  # pragma: no cover - kernel
    """Maximum of values[0 .. size-1] (shared, size a power of two), as ``tree_sum``."""
    tid = cuda.threadIdx.x
    stride = size // 2
    while stride > 0:
        cuda.syncthreads()
        for i in range(tid, stride, cuda.blockDim.x):
            values[i] = max(values[i], values[i + stride])
        stride //= 2
    cuda.syncthreads()
    best = values[0]
    cuda.syncthreads()
    return best
