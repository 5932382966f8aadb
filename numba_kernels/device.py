"""Is there a device to run on? A real CUDA GPU, or Numba's CUDA simulator.

The simulator (``NUMBA_ENABLE_CUDASIM=1``, read when numba is imported) runs
every kernel thread as a Python thread on the CPU: slow, but it runs the same
kernel source, so CI checks the kernels without a GPU.
"""

from __future__ import annotations

from numba import config, cuda

NO_CUDA = "no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set"


class NoCudaError(RuntimeError):
    """Raised when the numba backend is asked for and there is nothing to run it on."""

    def __init__(self, message: str = NO_CUDA) -> None:
        super().__init__(message)


def simulated() -> bool:
    return bool(config.ENABLE_CUDASIM)


def cuda_available() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reads as no GPU
        return False


def require_cuda() -> None:
    if not cuda_available():
        raise NoCudaError()


def device_name() -> str:
    """The GPU's name, the key of the tuning table; "simulator" under the simulator."""
    if simulated():
        return "simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)

