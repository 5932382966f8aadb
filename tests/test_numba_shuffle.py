"""The memory shuffle kernel moves exactly what the NumPy shuffle (``KVSlots.move``) moves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from numba_kernels.device import NO_CUDA, cuda_available
from numba_kernels.shuffle import move_slots
from numba_kernels.simulator import quick_switching
from reference import GPTConfig, KVSlots

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=16, n_ctx=40)  # [2, n_slots, 2, 40, 8]
N_SLOTS = 6


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


@st.composite
def shuffle_plans(draw):
    """Distinct sources moved into distinct holes, each with the length it has cached."""
    order = draw(st.permutations(range(N_SLOTS)))
    n_moves = draw(st.integers(1, N_SLOTS // 2))
    src, dst = np.array(order[:n_moves]), np.array(order[n_moves : 2 * n_moves])
    lengths = np.array(draw(st.lists(st.integers(0, CONFIG.n_ctx), min_size=n_moves, max_size=n_moves)))
    return src, dst, lengths, draw(st.integers(0, 2**16))


@settings(max_examples=4, derandomize=True)
@given(plan=shuffle_plans())
def test_shuffle_kernel_equals_numpy_move(plan):
    src, dst, lengths, seed = plan
    rng = np.random.default_rng(seed)
    host = KVSlots(CONFIG, N_SLOTS)
    host.k[:] = rng.standard_normal(host.k.shape, dtype=np.float32)
    host.v[:] = rng.standard_normal(host.v.shape, dtype=np.float32)
    state = rng.integers(0, CONFIG.n_ctx, size=N_SLOTS).astype(np.int32)
    k, v, slot_lengths = cuda.to_device(host.k), cuda.to_device(host.v), cuda.to_device(state)
    move_slots(k, v, slot_lengths, src, dst, lengths)
    host.move(src, dst, lengths)
    state[dst] = state[src]
    assert np.array_equal(k.copy_to_host(), host.k), "K differs from the NumPy shuffle"
    assert np.array_equal(v.copy_to_host(), host.v), "V differs from the NumPy shuffle"
    assert np.array_equal(slot_lengths.copy_to_host(), state), "the per-slot state did not move with its slot"


def test_shuffle_longer_than_one_block_chunk():
    """A run of lengths * head_dim floats longer than one block's chunk takes several blocks."""
    config = GPTConfig(n_layer=1, n_head=1, n_embd=64, vocab_size=16, n_ctx=80)  # run 80 * 64 > 2048
    host = KVSlots(config, 2)
    host.k[:] = np.random.default_rng(0).standard_normal(host.k.shape, dtype=np.float32)
    host.v[:] = -host.k
    k, v, state = cuda.to_device(host.k), cuda.to_device(host.v), cuda.to_device(np.array([80, 0], np.int32))
    move_slots(k, v, state, np.array([0]), np.array([1]), np.array([79]))
    host.move(np.array([0]), np.array([1]), np.array([79]))
    assert np.array_equal(k.copy_to_host(), host.k) and np.array_equal(v.copy_to_host(), host.v)
    assert state.copy_to_host().tolist() == [80, 80]


def test_shuffle_refuses_a_destination_that_is_a_source():
    k = cuda.device_array((1, 3, 1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="distinct holes"):
        move_slots(k, k, cuda.device_array(3, np.int32), np.array([0, 1]), np.array([1, 2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        move_slots(k, k, cuda.device_array(3, np.int32), np.array([0]), np.array([2]), np.array([5]))
