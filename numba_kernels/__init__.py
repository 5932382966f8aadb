"""GPT-2 on a CUDA GPU with Numba kernels a reader can follow, checked on the CPU by Numba's CUDA simulator.

One kernel per file, its versions in the file's header:

- ``gemm``: naive, tiled (shared memory, register blocking) and GEMV; ``dispatch``
  picks one per shape from the table ``tune`` writes. All bitwise equal.
- ``attention``: decode attention over the KV slots, causal prefill, the K/V store.
- ``elementwise``: embedding, layer norm, GELU, residual add (``reduce``: fixed-order block sums).
- ``shuffle``: the memory shuffle's copy, every pair and layer in one launch.
- ``backend``: ``NumbaBackend``, the Backend protocol of ``reference/backend.py`` over them;
  ``tp_shard``: ``TPShard``, one tensor-parallel rank's share on its GPU (the inner of ``mpi_tp``).
- ``device``: ``require_cuda`` and ``NoCudaError``; ``timing``: GPU time without launch overhead;
  ``simulator``: a race in Numba's CUDA simulator closed and its barriers quickened, for CI.
- ``catalog``, ``inspect``, ``roofline``: every kernel compiled and assembled without a GPU, and priced.
"""

from numba_kernels.backend import NumbaBackend
from numba_kernels.device import NO_CUDA, NoCudaError, cuda_available, require_cuda, simulated
from numba_kernels.tp_shard import TPShard

if simulated():
    from numba_kernels.simulator import guard_shared_arrays, quick_barriers

    guard_shared_arrays()
    quick_barriers()

__all__ = ["NO_CUDA", "NoCudaError", "NumbaBackend", "TPShard", "cuda_available", "require_cuda"]
