"""GPT-2 on a CUDA GPU with Numba kernels a reader can follow, checked on the CPU by Numba's CUDA simulator.

One kernel per file, its versions in the file's header:

- ``gemm``: v1 naive, v2 tiled (shared memory, register blocking) and v3 GEMV;
  ``gemm_staged``: v4, a GEMV whose block stages weight strips in shared memory,
  double-buffered, with fused epilogues (``epilogue``: residual add, GELU, K/V store);
  ``gemm_prefetch``: v5, padded tiles, 8x8 a thread, register prefetch. ``dispatch``
  picks one per shape from the table ``tune`` writes. All bitwise equal.
- ``attention``: v1 decode attention over the KV slots, causal prefill, the K/V store;
  ``attention_chunked``: v2, chunks of positions combined in chunk order.
- ``elementwise``: embedding, layer norm (v1 and v2), GELU, residual add, row gather
  (``reduce``: fixed-order block sums and trees).
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
