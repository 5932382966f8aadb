"""The batch-invariant CPU kernels: a row's result is bitwise the same alone or at any place in any batch.

Each kernel is also checked against the NumPy op it replaces, to float32 rounding.
Shapes are odd on purpose: K and N that leave partial column tiles, batches
that leave partial row blocks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference import invariant, ops
from reference.model import blas_decode_attention

SHAPE = st.integers(1, 150)
BATCH = st.integers(1, 40)
SEED = st.integers(0, 2**32 - 1)


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def assert_rows_bitwise_alone(kernel, batch: np.ndarray, rest: tuple = ()) -> np.ndarray:
    """Every row of ``kernel(batch)`` equals ``kernel`` of that row alone, bitwise."""
    batched = kernel(batch, *rest)
    for r in range(len(batch)):
        alone = kernel(batch[r : r + 1], *rest)[0]
        assert np.array_equal(alone, batched[r]), f"row {r} of {len(batch)} differs from the row alone"
    return batched


@settings(max_examples=30)
@given(k=SHAPE, n=SHAPE, b=BATCH, seed=SEED)
@example(k=768, n=130, b=33, seed=0)
@example(k=50, n=128, b=7, seed=1)  # a plain weight read in place (N a multiple of TILE_N)
def test_matmul_rows_bitwise_equal_alone_and_close_to_numpy(k, n, b, seed):
    rng = np.random.default_rng(seed)
    x, w, bias = normal(rng, b, k), normal(rng, k, n), normal(rng, n)
    packed = invariant.pack_weight(w)
    batched = assert_rows_bitwise_alone(invariant.matmul_rows, x, (packed, bias))
    assert batched.shape == (b, n)
    assert np.array_equal(invariant.matmul_rows(x, w, bias), batched), "a plain weight sums otherwise than a packed one"
    assert np.array_equal(invariant.matmul_rows(x[:1], w, bias)[0], batched[0])
    expected = x.astype(np.float64) @ w + bias  # [B, N]
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w) + np.abs(bias))  # forward error of a dot
    assert np.all(np.abs(batched - expected) <= bound)


@settings(max_examples=15)
@given(k=SHAPE, n=SHAPE, b=BATCH, seed=SEED)
def test_matmul_row_bitwise_equal_at_every_position(k, n, b, seed):
    """One request's row, put at each place of a batch of other rows, always gives the same bits."""
    rng = np.random.default_rng(seed)
    w, bias = invariant.pack_weight(normal(rng, k, n)), normal(rng, n)
    row = normal(rng, 1, k)  # [1, K]
    alone = invariant.matmul_rows(row, w, bias)[0]
    others = normal(rng, b, k)
    for place in range(b):
        batch = others.copy()
        batch[place] = row[0]
        assert np.array_equal(invariant.matmul_rows(batch, w, bias)[place], alone), f"row at {place} of {b} differs"


def test_pack_weight_tiles_are_aligned_and_zero_padded():
    w = normal(np.random.default_rng(0), 5, invariant.TILE_N + 3)
    packed = invariant.pack_weight(w)
    assert packed.tiles.shape == (2, 5, invariant.TILE_N) and packed.shape == w.shape
    assert packed.tiles.ctypes.data % invariant.ALIGN == 0
    assert np.array_equal(packed.tiles[0], w[:, : invariant.TILE_N])
    assert np.array_equal(packed.tiles[1, :, :3], w[:, invariant.TILE_N :]) and not packed.tiles[1, :, 3:].any()


@settings(max_examples=30)
@given(c=SHAPE, b=BATCH, seed=SEED)
def test_layer_norm_rows_bitwise_equal_alone_and_close_to_numpy(c, b, seed):
    rng = np.random.default_rng(seed)
    x, g, beta = normal(rng, b, c, scale=3.0) + np.float32(1.0), normal(rng, c), normal(rng, c)
    batched = assert_rows_bitwise_alone(invariant.layer_norm_rows, x, (g, beta, 1e-5))
    expected = ops.layer_norm(x.astype(np.float64), g, beta, 1e-5)
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=30)
@given(d=st.integers(1, 300), b=BATCH, seed=SEED)
def test_gelu_rows_bitwise_equal_alone_and_close_to_numpy(d, b, seed):
    rng = np.random.default_rng(seed)
    x = normal(rng, b, d, scale=4.0)
    batched = assert_rows_bitwise_alone(invariant.gelu_rows, x)
    np.testing.assert_allclose(batched, ops.gelu(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_gelu_and_layer_norm_bits_do_not_depend_on_memory_layout():
    """The decode step hands these kernels views (a column slice of a matmul's output); a copy gives the same bits."""
    rng = np.random.default_rng(1)
    wide = normal(rng, 7, 200, scale=3.0)
    view = wide[:, 3:150]  # [7, 147], rows not contiguous
    assert np.array_equal(invariant.gelu_rows(view), invariant.gelu_rows(np.ascontiguousarray(view)))
    g, beta = normal(rng, 147), normal(rng, 147)
    assert np.array_equal(
        invariant.layer_norm_rows(view, g, beta, 1e-5), invariant.layer_norm_rows(np.ascontiguousarray(view), g, beta, 1e-5)
    )


def test_gelu_close_to_float64_everywhere():
    """The rational tanh inside GELU, over the whole range: a few ulps, plus float32's cancellation in
    1 + tanh for negative inputs (up to 2e-7 |x| here; NumPy's float32 GELU loses 1.2e-7 |x|)."""
    v = np.concatenate([np.linspace(-12, 12, 200_001), np.geomspace(1e-30, 1, 2_001)]).astype(np.float32)
    got = invariant.gelu_rows(v[None])[0]
    x = v.astype(np.float64)
    expected = ops.gelu(x)
    assert np.all(np.abs(got - expected) <= 5 * np.spacing(np.abs(expected).astype(np.float32)) + 2e-7 * np.abs(x))


@st.composite
def attention_batches(draw):
    """Queries for B requests in distinct slots of a KV cache, each with its own length."""
    n_head, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    n_ctx, b = draw(st.integers(1, 48)), draw(BATCH)
    n_slots = b + draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(SEED))
    k_cache = normal(rng, n_slots, n_head, n_ctx, head_dim)  # [S, H, T, D]
    v_cache = normal(rng, n_slots, n_head, n_ctx, head_dim)
    q = normal(rng, b, n_head, head_dim, scale=2.0)  # [B, H, D]
    slots = rng.permutation(n_slots)[:b]
    lengths = rng.integers(1, n_ctx + 1, size=b)
    return q, k_cache, v_cache, slots, lengths


@settings(max_examples=30)
@given(batch=attention_batches())
def test_decode_attention_bitwise_equal_alone_and_close_to_numpy(batch):
    q, k_cache, v_cache, slots, lengths = batch
    batched = invariant.decode_attention(q, k_cache, v_cache, slots, lengths)
    for r in range(len(q)):
        alone = invariant.decode_attention(q[r : r + 1], k_cache, v_cache, slots[r : r + 1], lengths[r : r + 1])[0]
        assert np.array_equal(alone, batched[r]), f"request {r} of {len(q)} differs from the request alone"
    expected = blas_decode_attention(q.astype(np.float64), k_cache, v_cache, slots, lengths)
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-5)


def test_decode_attention_reads_only_its_own_positions():
    """What lies past a request's length, or in other slots, cannot change its output."""
    rng = np.random.default_rng(2)
    k_cache, v_cache = normal(rng, 3, 2, 16, 8), normal(rng, 3, 2, 16, 8)
    q, slots, lengths = normal(rng, 1, 2, 8), np.array([1]), np.array([5])
    before = invariant.decode_attention(q, k_cache, v_cache, slots, lengths)
    k_cache[1, :, 5:], v_cache[1, :, 5:] = np.nan, np.nan
    k_cache[[0, 2]], v_cache[[0, 2]] = np.inf, np.inf
    assert np.array_equal(invariant.decode_attention(q, k_cache, v_cache, slots, lengths), before)


@settings(max_examples=30)
@given(batch=attention_batches(), block_size=st.integers(1, 20), seed=SEED)
def test_attention_rows_bitwise_equal_whatever_block_size_and_place(batch, block_size, seed):
    """The same positions cut into blocks of any size at random places: the same bits as in slots,
    and positions past a row's length (poisoned with NaN) are never read."""
    q, k_cache, v_cache, slots, lengths = batch
    in_slots = invariant.decode_attention(q, k_cache, v_cache, slots, lengths)
    n_slots, n_head, n_ctx, head_dim = k_cache.shape
    per = -(-n_ctx // block_size)  # blocks a slot's positions take
    table = np.random.default_rng(seed).permutation(n_slots * per).reshape(n_slots, per)  # slot s -> its blocks
    paged_k = np.full((n_slots * per, n_head, block_size, head_dim), np.nan, np.float32)
    paged_v = paged_k.copy()
    for s in range(n_slots):
        for j, block in enumerate(table[s]):
            used = slice(j * block_size, min((j + 1) * block_size, n_ctx))
            paged_k[block, :, : used.stop - used.start] = k_cache[s, :, used]
            paged_v[block, :, : used.stop - used.start] = v_cache[s, :, used]
    for s, n in zip(slots, lengths):
        for p in range(n, per * block_size):  # every position past the row's length
            paged_k[table[s, p // block_size], :, p % block_size] = np.nan
            paged_v[table[s, p // block_size], :, p % block_size] = np.nan
    paged = invariant.attention_rows(q, paged_k, paged_v, table[slots], np.arange(len(q)), lengths)
    assert np.array_equal(paged, in_slots)


def test_blas_matmul_is_not_batch_invariant_here():
    """Why the invariant kernels exist: BLAS's 1-row matmul (GEMV) sums in another order than its GEMM."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 768), dtype=np.float32)
    w = rng.standard_normal((768, 2304), dtype=np.float32)
    differ = np.count_nonzero((x[:1] @ w)[0] != (x @ w)[0])
    assert differ > 0, "this BLAS happens to be batch invariant for this shape"
