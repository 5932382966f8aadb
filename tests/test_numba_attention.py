"""Attention kernels: decode over each request's own slot and length (version 1, one block a query and head;
version 2, chunks of positions combined in chunk order), causal prefill, and the K/V store."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from numba_kernels import attention_chunked
from numba_kernels.attention import attention, prefill_attention, store_kv
from numba_kernels.device import NO_CUDA, cuda_available
from numba_kernels.simulator import quick_switching
from reference import ops
from reference.model import blas_decode_attention

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

N_SLOTS, N_HEAD, N_CTX, D = 5, 2, 24, 8
C = N_HEAD * D


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def cache_with_nan_tails(lengths_by_slot: dict[int, int], seed: int, shape=(N_SLOTS, N_HEAD, N_CTX, D)):
    """Random K and V [n_slots, H, n_ctx, D], NaN past each slot's length: a read past it would show."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    for slot in range(shape[0]):
        n = lengths_by_slot.get(slot, 0)
        k[slot, :, n:] = np.nan
        v[slot, :, n:] = np.nan
    return k, v


VERSIONS = {"v1": attention, "v2": attention_chunked.attention}


def decode_attention(qkv, k, v, slots, lengths, version: str = "v1", **options) -> np.ndarray:
    out = cuda.to_device(np.full((len(slots), qkv.shape[1] // 3), np.nan, np.float32))
    VERSIONS[version](cuda.to_device(qkv), cuda.to_device(k), cuda.to_device(v), cuda.to_device(slots.astype(np.int32)),
                      cuda.to_device(lengths.astype(np.int32)), out, **options)  # fmt: skip
    got = out.copy_to_host()
    assert not np.isnan(got).any(), "an output was not written, or a position past a length was read"
    return got


@st.composite
def decode_batches(draw):
    size = draw(st.integers(1, N_SLOTS))
    slots = np.array(draw(st.permutations(range(N_SLOTS)))[:size])
    lengths = np.array(draw(st.lists(st.integers(1, N_CTX), min_size=size, max_size=size)))
    return slots, lengths, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=3, derandomize=True)
@given(batch=decode_batches())
def test_decode_attention_matches_numpy_and_reads_only_own_length(version, batch):
    slots, lengths, seed = batch
    k, v = cache_with_nan_tails(dict(zip(slots.tolist(), lengths.tolist())), seed)
    qkv = np.random.default_rng(seed + 1).standard_normal((len(slots), 3 * C), dtype=np.float32)
    got = decode_attention(qkv, k, v, slots, lengths, version)
    q = np.ascontiguousarray(qkv[:, :C].reshape(len(slots), N_HEAD, D))
    want = blas_decode_attention(q, k, v, slots, lengths).reshape(len(slots), C)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("n_head,n_ctx,d", [(1, 40, 72), (3, 70, 20), (1, 150, 8)])
def test_decode_attention_other_head_dims_and_block_sizes(version, n_head, n_ctx, d):
    """v1: head_dim above the block size (one group), a block of 128 threads. v2: chunks of 32 positions
    (head_dim 72) and of 64, a query over 2 and 3 chunks, the last one partial."""
    slots, lengths = np.array([1, 0]), np.array([n_ctx, 33])
    k, v = cache_with_nan_tails({1: n_ctx, 0: 33}, seed=8, shape=(2, n_head, n_ctx, d))
    qkv = np.random.default_rng(9).standard_normal((2, 3 * n_head * d), dtype=np.float32)
    got = decode_attention(qkv, k, v, slots, lengths, version)
    q = np.ascontiguousarray(qkv[:, : n_head * d].reshape(2, n_head, d))
    want = blas_decode_attention(q, k, v, slots, lengths).reshape(2, n_head * d)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_attention_row_alone_equals_row_in_batch(version):
    slots, lengths = np.array([4, 0, 2, 1]), np.array([24, 1, 9, 17])
    k, v = cache_with_nan_tails(dict(zip(slots.tolist(), lengths.tolist())), seed=3)
    qkv = np.random.default_rng(4).standard_normal((4, 3 * C), dtype=np.float32)
    batch = decode_attention(qkv, k, v, slots, lengths, version)
    for row in range(4):
        alone = decode_attention(qkv[row : row + 1], k, v, slots[row : row + 1], lengths[row : row + 1], version)
        assert np.array_equal(alone[0], batch[row]), f"row {row} changed in a batch of 4"


def test_chunked_attention_block_size_and_grid_change_no_bit():
    """Version 2 on a GPU's 128 threads and a full grid equals the simulator's 32 threads and the grid of the
    longest row: lengths on both sides of the 64-position chunk boundaries, 1 to 3 chunks."""
    n_ctx, lengths = 150, np.array([64, 1, 150, 65, 128])
    slots = np.arange(5)
    k, v = cache_with_nan_tails(dict(zip(slots.tolist(), lengths.tolist())), seed=11, shape=(5, 1, n_ctx, 8))
    qkv = np.random.default_rng(12).standard_normal((5, 3 * 8), dtype=np.float32)
    small = decode_attention(qkv, k, v, slots, lengths, "v2", threads=32, longest=150)
    gpu = decode_attention(qkv, k, v, slots, lengths, "v2", threads=128)
    assert np.array_equal(small, gpu)
    for row in (0, 1, 3):  # fewer chunks than the longest row: alone, its own
        alone = decode_attention(qkv[row : row + 1], k, v, slots[row : row + 1], lengths[row : row + 1], "v2")
        assert np.array_equal(alone[0], small[row]), f"a row of {lengths[row]} positions changed beside one of 150"
    partials = cuda.device_array((5, 1, 2, 10), np.float32)
    with pytest.raises(ValueError, match="partials"):
        decode_attention(qkv, k, v, slots, lengths, "v2", partials=partials)


def test_prefill_attention_is_causal_attention():
    n, slot = 11, 3
    rng = np.random.default_rng(5)
    k, v = cache_with_nan_tails({slot: n}, seed=6)
    qkv = rng.standard_normal((n, 3 * C), dtype=np.float32)
    out = cuda.to_device(np.full((n, C), np.nan, np.float32))
    prefill_attention(cuda.to_device(qkv), cuda.to_device(k), cuda.to_device(v), slot, out)
    q = ops.split_heads(qkv[:, :C], N_HEAD)  # [H, n, D]
    want = ops.merge_heads(ops.causal_attention(q, k[slot, :, :n], v[slot, :, :n]))
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-5, atol=1e-5)


def test_store_kv_writes_each_row_into_its_slot_and_position():
    rng = np.random.default_rng(7)
    qkv = rng.standard_normal((3, 3 * C), dtype=np.float32)
    slots, positions = np.array([2, 0, 4]), np.array([5, 0, 23])
    k = cuda.to_device(np.zeros((N_SLOTS, N_HEAD, N_CTX, D), np.float32))
    v = cuda.to_device(np.zeros((N_SLOTS, N_HEAD, N_CTX, D), np.float32))
    lengths = cuda.to_device(np.zeros(N_SLOTS, np.int32))
    store_kv(cuda.to_device(qkv), k, v, cuda.to_device(slots.astype(np.int32)),
             cuda.to_device(positions.astype(np.int32)), lengths)  # fmt: skip
    want_k, want_v = np.zeros((2, N_SLOTS, N_HEAD, N_CTX, D), np.float32)
    for row, (s, t) in enumerate(zip(slots, positions)):
        want_k[s, :, t] = qkv[row, C : 2 * C].reshape(N_HEAD, D)
        want_v[s, :, t] = qkv[row, 2 * C :].reshape(N_HEAD, D)
    assert np.array_equal(k.copy_to_host(), want_k)
    assert np.array_equal(v.copy_to_host(), want_v)
    assert lengths.copy_to_host().tolist() == [1, 0, 6, 0, 24]


def test_attention_refuses_a_context_too_long_for_shared_memory():
    big = cuda.device_array((1, 1, 20000, 8), np.float32)
    with pytest.raises(ValueError, match="n_ctx"):
        attention(cuda.device_array((1, 24), np.float32), big, big, None, None, None)
