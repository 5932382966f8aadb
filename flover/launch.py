"""Open a backend for a command: one process, or tensor parallel over MPI ranks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flover.backends import make_backend
from reference import GPT2Weights, GPTConfig
from reference.backend import Backend


@contextmanager
def open_backend(name: str, config: GPTConfig, weights: GPT2Weights, n_slots: int, tp: bool = False
                 ) -> Iterator[Backend | None]:  # fmt: skip
    """Yield the backend; under ``tp``, rank 0 gets it and the other ranks get None
    after serving rank 0's steps until it closes."""
    if not tp:
        yield make_backend(name, config, weights, n_slots)
        return
    import mpi_tp

    inner = "numba" if name == "numba" else "numpy"
    backend = mpi_tp.launch(config, weights, n_slots, inner=inner)
    try:
        yield backend
    finally:
        if backend is not None:
            backend.close()
