"""A backend's thread count is its own: one asking for fewer threads does not slow the next on the same thread."""

from __future__ import annotations

import numba
import pytest

from reference import GPTConfig, Lane, NumpyBackend, init_weights
from reference.backend import ONE_THREAD_BELOW, block_weights

# blocks just over the size below which a backend keeps to one thread; a small vocabulary and context
WIDE = GPTConfig(n_layer=1, n_head=2, n_embd=640, vocab_size=64, n_ctx=16)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_a_one_thread_backend_leaves_the_next_backend_all_threads():
    assert block_weights(WIDE) >= ONE_THREAD_BELOW
    weights = init_weights(WIDE, seed=0)
    one, every = NumpyBackend(WIDE, weights, 1, threads=1), NumpyBackend(WIDE, weights, 1)
    lane = Lane.of([0], [1, 2, 3], 0)
    one.step([lane])
    assert numba.get_num_threads() == 1
    every.step([lane])
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
