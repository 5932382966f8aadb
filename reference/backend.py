"""The seam between the engine and the math: the Backend protocol and its NumPy implementation.

The engine owns scheduling and slot bookkeeping; a backend owns the arrays
(weights, KV slots) and the math. Other backends (Numba CUDA, MPI tensor
parallel) implement the same few methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numba
import numpy as np

from reference import model
from reference.config import GPTConfig
from reference.kv import KVSlots
from reference.weights import GPT2Weights, Linear


@runtime_checkable
class Backend(Protocol):
    config: GPTConfig
    n_slots: int

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """Run one prompt into ``slot``; -> logits of its last position [V]."""
        ...

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One fused step: token b at positions[b] of slot slots[b]; -> [B, V] logits."""
        ...

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        """The memory shuffle: copy the first lengths[i] positions of src[i] into dst[i]."""
        ...


class NumpyBackend:
    """GPT-2 on the CPU with batch-invariant kernels (prefill and decode).

    ``invariant=False`` runs on BLAS instead: faster for some batch sizes,
    but a request's logits then depend on its batch, so fused decoding is no
    longer bitwise equal to serial decoding.
    """

    def __init__(self, config: GPTConfig, weights: GPT2Weights, n_slots: int = 1, invariant: bool = True,
                 threads: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.threads = threads  # Numba threads for this backend's calls from the calling thread; None: all
        self.weights = weights
        self.n_slots = n_slots
        self.invariant = invariant
        self.cache = KVSlots(config, n_slots)
        self.dops = model.INVARIANT_OPS if invariant else model.BLAS_OPS
        self.decode_weights = model.prepare_weights(weights, self.dops)  # packed once for the invariant kernels
        self.head = Linear(self.dops.prepare(weights.head.T), np.zeros(config.vocab_size, np.float32))  # [C, V]

    def _use_own_threads(self) -> None:
        if self.threads is not None:
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))  # per calling thread

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        self._use_own_threads()
        return model.prefill(self.decode_weights, self.config, self.cache, slot, tokens, self.head, self.dops)

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self._use_own_threads()
        slots = np.asarray(slots, np.int64)
        return model.decode(
            self.decode_weights, self.config, self.cache, slots,
            np.asarray(tokens, np.int64), np.asarray(positions, np.int64), self.head, self.dops,
        )  # fmt: skip

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        self.cache.move(src, dst, lengths)
