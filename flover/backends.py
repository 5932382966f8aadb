"""Backends by name. The engine sees only the Backend protocol of ``reference.backend``."""

from __future__ import annotations

from dataclasses import dataclass

from reference import GPT2Weights, GPTConfig, KVShape, NumpyBackend
from reference.backend import Backend

BACKENDS = ("numpy", "numpy-blas", "numba")


def make_backend(name: str, config: GPTConfig, weights: GPT2Weights, kv: int | KVShape) -> Backend:
    """``numpy``: batch-invariant CPU kernels (the default, bitwise fused == serial);
    ``numpy-blas``: BLAS steps, fastest for one request, not batch invariant;
    ``numba``: Numba CUDA kernels on a GPU (or the CUDA simulator).
    ``kv``: the KV memory, as a number of full-context slots or a ``KVShape``."""
    if name == "numpy":
        return NumpyBackend(config, weights, kv, invariant=True)
    if name == "numpy-blas":
        return NumpyBackend(config, weights, kv, invariant=False)
    if name == "numba":
        import numba_kernels

        try:
            numba_kernels.require_cuda()
        except numba_kernels.NoCudaError as missing:
            raise ValueError(f"backend 'numba': {missing}") from None
        from numba_kernels.backend import NumbaBackend

        return NumbaBackend(config, weights, kv)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class BackendFactory:
    """Fresh backends of one model for any KV memory; picklable, so instance processes build their own."""

    name: str
    config: GPTConfig
    weights: GPT2Weights

    def __call__(self, kv: int | KVShape) -> Backend:
        return make_backend(self.name, self.config, self.weights, kv)
