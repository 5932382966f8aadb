"""NumbaBackend beyond the contract every backend keeps (``tests/test_backend_contract.py``):
what it needs to run, the KV layout it holds, the buffers a large step needs, the per-slot state it moves."""

from __future__ import annotations

import numpy as np
import pytest

import numba_kernels
from numba_kernels import NO_CUDA, NoCudaError, NumbaBackend, cuda_available
from numba_kernels.simulator import quick_switching
from reference import GPTConfig, KVShape, Lane, init_weights

needs_cuda = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

# the simulator's cost is a Python thread per GPU thread
CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_ctx=8)


@pytest.fixture(scope="module")
def small_model():
    return CONFIG, init_weights(CONFIG, seed=1, std=0.3)


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def test_require_cuda_names_what_is_missing(monkeypatch, small_model):
    monkeypatch.setattr(numba_kernels.device, "cuda_available", lambda: False)
    with pytest.raises(NoCudaError, match="^no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set$"):
        numba_kernels.require_cuda()
    with pytest.raises(NoCudaError):
        NumbaBackend(*small_model)


@needs_cuda
def test_paged_kv_is_refused_naming_the_block_size(small_model):
    with pytest.raises(ValueError, match="slots of n_ctx 8 positions, got blocks of 4; use the numpy backend for paged KV"):
        NumbaBackend(*small_model, n_slots=KVShape(n_blocks=6, block_size=4))
    assert NumbaBackend(*small_model, n_slots=KVShape(n_blocks=3, block_size=8)).n_slots == 3


@needs_cuda
def test_a_step_longer_than_the_buffers_grows_them(small_model):
    """Two full prompts in one step are 16 rows, more than the 8 the buffers start with."""
    backend = NumbaBackend(*small_model, n_slots=2)
    prompts = [np.arange(8) * 7 % 64, np.arange(8)[::-1]]
    both = backend.step([Lane.of([s], p, 0) for s, p in enumerate(prompts)])
    assert backend.work.rows == 16
    for s, p in enumerate(prompts):
        assert np.array_equal(backend.step([Lane.of([s], p, 0)])[0], both[s])


@needs_cuda
def test_moved_slot_takes_its_cached_length_along(small_model):
    backend = NumbaBackend(*small_model, n_slots=4)
    backend.step([Lane.of([1], [9, 9, 2], 0), Lane.of([3], [33, 1, 60, 5], 0)])
    backend.move_slots(np.array([3]), np.array([0]), np.array([4]))
    assert backend.cached_lengths().tolist() == [4, 3, 0, 4], "the slot's state moved with it"
