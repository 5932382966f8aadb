"""GPT-2 on a CUDA GPU with Numba kernels a reader can follow, checked on the CPU by Numba's CUDA simulator.

One kernel per file, its versions in the file's header: ``gemm`` (naive, tiled,
gemv) with ``dispatch`` and ``tune``; ``attention``; ``elementwise``; the
memory ``shuffle``; and ``NumbaBackend``, the Backend protocol over them.
"""

from numba_kernels.backend import NumbaBackend
from numba_kernels.device import NO_CUDA, NoCudaError, cuda_available, require_cuda

__all__ = ["NO_CUDA", "NoCudaError", "NumbaBackend", "cuda_available", "require_cuda"]
