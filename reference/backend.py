"""The seam between the engine and the math: the Backend protocol and its NumPy implementation.

The engine owns scheduling and memory bookkeeping; a backend owns the arrays
(weights, KV blocks) and the math. A backend does two things:

- ``step(lanes)``: one ragged step (see ``reference.lanes``): each lane's new
  tokens into its KV blocks, the logits of each lane's last token back;
- ``move(src, dst, lengths)``: the memory shuffle's copies between blocks.

``prefill`` and ``decode`` are the two classic steps written as lanes, for
teaching and for serial generation: a prefill is one lane with the whole
prompt from position 0, a decode one lane of one token per request. Here a
"slot" is the consecutive blocks that hold one full-context request (one
block when the block size is n_ctx, Flover's layout). Other backends (Numba
CUDA, MPI tensor parallel) subclass ``LaneBackend`` and implement ``step``
and ``move`` over their own memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numba
import numpy as np

from reference import model
from reference.config import GPTConfig
from reference.kv import KVBlocks, KVShape, check_move
from reference.lanes import Lane, plan_rows
from reference.weights import GPT2Weights, Linear


@runtime_checkable
class Backend(Protocol):
    config: GPTConfig
    kv: KVShape

    def step(self, lanes: Sequence[Lane]) -> np.ndarray:
        """One ragged step; -> [len(lanes), V]: the logits of each lane's last new token."""
        ...

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        """The memory shuffle: copy the first lengths[i] positions of block src[i] into block dst[i]."""
        ...


class LaneBackend:
    """What every backend shares: the classic steps written as lanes, and the argument checks."""

    config: GPTConfig
    kv: KVShape

    @property
    def n_slots(self) -> int:
        """Full-context requests the KV memory holds at once."""
        return self.kv.n_slots(self.config)

    def slot_blocks(self, slot: int) -> np.ndarray:
        """The blocks of ``slot``: [m] consecutive blocks holding n_ctx positions (one block in Flover's layout)."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot out of range 0..{self.n_slots - 1}: {slot}")
        m = self.kv.blocks_per_slot(self.config)
        return np.arange(slot * m, (slot + 1) * m)

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """Run one prompt into ``slot`` from position 0; -> logits of its last position [V]."""
        return self.step([Lane.of(self.slot_blocks(int(slot)), tokens, 0)])[0]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One fused step: token b at positions[b] of slot slots[b]; -> [B, V] logits."""
        slots, tokens, positions = (np.asarray(a, np.int64).reshape(-1) for a in (slots, tokens, positions))
        if not len(slots) == len(tokens) == len(positions):
            raise ValueError(f"decode needs one token and position per slot, got {len(slots)}, {len(tokens)}, "
                             f"{len(positions)}")  # fmt: skip
        if len(slots) == 0:
            return np.zeros((0, self.config.vocab_size), np.float32)
        return self.step([Lane.of(self.slot_blocks(int(s)), t, p) for s, t, p in zip(slots, tokens, positions)])

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """The memory shuffle in Flover's layout, where a slot is one block."""
        if self.kv.blocks_per_slot(self.config) != 1:
            raise ValueError(f"slots move as single blocks; blocks of {self.kv.block_size} positions hold less than "
                             f"n_ctx {self.config.n_ctx}")  # fmt: skip
        src = np.asarray(src, np.int64)
        lengths = np.full(src.shape, self.kv.block_size) if lengths is None else np.asarray(lengths, np.int64)
        self.move(src, np.asarray(dst, np.int64), lengths)

    def check_move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        check_move(src, dst, self.kv.n_blocks)
        if lengths.shape != src.shape or (lengths.size and not (0 <= lengths.min() and lengths.max() <= self.kv.block_size)):
            raise ValueError(f"move lengths must be one per pair in 0..{self.kv.block_size}, got {lengths.tolist()}")


# A model this small computes each op in microseconds, less than it takes to wake a second thread: on
# the shipped model (0.8M weights in its blocks) a batch-1 step took 1.1 ms on one thread against
# 1.3 ms (quiet) to 17 ms (another process on the other core) on two. gpt2's blocks hold 85M.
ONE_THREAD_BELOW = 4_000_000


def block_weights(config: GPTConfig) -> int:
    """Weights in the transformer blocks' four linears: n_layer * C * (4C + 2 * d_mlp)."""
    return config.n_layer * config.n_embd * (4 * config.n_embd + 2 * config.d_mlp)


class NumpyBackend(LaneBackend):
    """GPT-2 on the CPU with batch-invariant kernels, over KV memory of ``kv`` (an int: that many slots).

    ``threads``: Numba threads for its steps (None: all, or one for a model too small to share).
    ``invariant=False`` runs on BLAS instead: faster for some batch sizes,
    but a request's logits then depend on its step, so fused decoding is no
    longer bitwise equal to serial decoding.
    """

    def __init__(self, config: GPTConfig, weights: GPT2Weights, n_slots: int | KVShape = 1, invariant: bool = True,
                 threads: int | None = None) -> None:  # fmt: skip
        self.config = config
        if threads is None and block_weights(config) < ONE_THREAD_BELOW:
            threads = 1
        self.threads = threads  # Numba threads for this backend's steps on the calling thread; None: all
        self.weights = weights
        self.invariant = invariant
        self.cache = KVBlocks(config, n_slots)
        self.kv = self.cache.shape
        self.sops = model.INVARIANT_OPS if invariant else model.BLAS_OPS
        self.step_weights = model.prepare_weights(weights, self.sops)  # packed once for the invariant kernels
        self.head = Linear(self.sops.prepare(weights.head.T), np.zeros(config.vocab_size, np.float32))  # [C, V]

    def step(self, lanes: Sequence[Lane]) -> np.ndarray:
        rows = plan_rows(self.config, self.kv, lanes)
        # per calling thread, and every step: another backend may have asked this thread for fewer
        numba.set_num_threads(min(self.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
        return model.step(self.step_weights, self.config, self.cache, rows, self.head, self.sops)

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        src, dst, lengths = (np.asarray(a, np.int64) for a in (src, dst, lengths))
        self.check_move(src, dst, lengths)
        self.cache.move(src, dst, lengths)
