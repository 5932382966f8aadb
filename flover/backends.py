"""Backends by name. The engine sees only the Backend protocol of ``reference.backend``."""

from __future__ import annotations

from reference import GPT2Weights, GPTConfig, NumpyBackend
from reference.backend import Backend

BACKENDS = ("numpy", "numpy-blas", "numba")


def make_backend(name: str, config: GPTConfig, weights: GPT2Weights, n_slots: int) -> Backend:
    """``numpy``: batch-invariant CPU kernels (the default, bitwise fused == serial);
    ``numpy-blas``: BLAS decode, fastest for one request, not batch invariant;
    ``numba``: Numba CUDA kernels on a GPU (or the CUDA simulator)."""
    if name == "numpy":
        return NumpyBackend(config, weights, n_slots, invariant=True)
    if name == "numpy-blas":
        return NumpyBackend(config, weights, n_slots, invariant=False)
    if name == "numba":
        import numba_kernels

        try:
            numba_kernels.require_cuda()
        except numba_kernels.NoCudaError as missing:
            raise ValueError(f"backend 'numba': {missing}") from None
        from numba_kernels.backend import NumbaBackend

        return NumbaBackend(config, weights, n_slots)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
