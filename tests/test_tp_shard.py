"""Sharding and the rank-0 backend in one process (a world of one rank, or shards side by side)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from mpi_tp import check_world, launch, shard_weights, vocab_bounds  # noqa: E402
from mpi_tp.backend import shard_factory  # noqa: E402
from reference import GPTConfig, NumpyBackend, init_weights, preset  # noqa: E402

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_ctx=64)


def test_world_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match=r"n_head 4 .* 3 tensor-parallel ranks"):
        check_world(preset("tiny"), 3)
    with pytest.raises(ValueError, match=r"d_mlp 6 .* 4 tensor-parallel ranks"):
        check_world(CONFIG.with_(n_inner=6), 4)
    with pytest.raises(ValueError, match="n_head 4"):
        shard_weights(CONFIG, init_weights(CONFIG), 0, 8)


@given(st.integers(1, 60_000), st.integers(1, 16))
def test_vocab_bounds_cover_the_vocabulary_evenly(vocab, world):
    bounds = vocab_bounds(vocab, world)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == vocab and len(sizes) == world
    assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_put_back_together_are_the_weights(world):
    weights = init_weights(CONFIG, seed=3)
    shards = [shard_weights(CONFIG, weights, r, world) for r in range(world)]
    assert all(s.n_head == CONFIG.n_head // world for s in shards)
    np.testing.assert_array_equal(np.concatenate([s.wte for s in shards]), weights.wte)
    np.testing.assert_array_equal(np.concatenate([s.head_w for s in shards], axis=1), weights.wte.T)
    for i, block in enumerate(weights.blocks):
        parts = [s.blocks[i] for s in shards]
        qkv = [np.split(p.c_attn.w, 3, axis=1) for p in parts]  # per rank: its q, k, v columns
        whole = np.concatenate([np.concatenate([q[j] for q in qkv], axis=1) for j in range(3)], axis=1)
        np.testing.assert_array_equal(whole, block.c_attn.w)
        np.testing.assert_array_equal(np.concatenate([p.attn_proj.w for p in parts]), block.attn_proj.w)
        np.testing.assert_array_equal(np.concatenate([p.c_fc.w for p in parts], axis=1), block.c_fc.w)
        np.testing.assert_array_equal(np.concatenate([p.mlp_proj.w for p in parts]), block.mlp_proj.w)
        for p in parts:  # each rank owns its arrays: no view keeps the full weights alive
            assert not any(np.shares_memory(a, b) for a in (p.attn_proj.w, p.attn_proj.b, p.ln_1.g)
                           for b in (block.attn_proj.w, block.attn_proj.b, block.ln_1.g))  # fmt: skip


def test_world_of_one_decodes_bitwise_like_numpy_backend():
    weights = init_weights(CONFIG, seed=1, std=0.3)
    tp, ref = launch(CONFIG, weights, 3, comm=MPI.COMM_SELF), NumpyBackend(CONFIG, weights, 3)
    prompt = np.arange(7) * 5
    np.testing.assert_allclose(tp.prefill(1, prompt), ref.prefill(1, prompt), rtol=1e-5, atol=1e-5)
    step = (np.array([1]), np.array([4]), np.array([7]))
    np.testing.assert_array_equal(tp.decode(*step), ref.decode(*step))
    tp.move_slots(np.array([1]), np.array([0]), np.array([8]))
    ref.move_slots(np.array([1]), np.array([0]), np.array([8]))
    step = (np.array([0]), np.array([9]), np.array([8]))
    np.testing.assert_array_equal(tp.decode(*step), ref.decode(*step))
    assert tp.decode(np.zeros(0), np.zeros(0), np.zeros(0)).shape == (0, CONFIG.vocab_size)
    assert tp.comm_seconds().shape == (1,)
    tp.close()
    with pytest.raises(RuntimeError, match="closed"):
        tp.decode(*step)


def test_bad_requests_raise_on_rank0_before_any_broadcast():
    tp = launch(CONFIG, init_weights(CONFIG), 2, comm=MPI.COMM_SELF)
    one = np.array([0])
    with pytest.raises(ValueError, match="slot out of range 0..1"):
        tp.decode(np.array([2]), one, one)
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary 0..96"):
        tp.prefill(0, np.array([1, 97]))
    with pytest.raises(ValueError, match="each slot once"):
        tp.decode(np.array([1, 1]), np.array([0, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="positions must lie in 0..63"):
        tp.decode(one, one, np.array([64]))
    with pytest.raises(ValueError, match="distinct holes"):
        tp.move_slots(np.array([0]), np.array([0]), np.array([1]))
    assert not tp.broken
    tp.close()


def test_inner_backends_are_named_clearly():
    with pytest.raises(ValueError, match="unknown tensor-parallel inner backend 'cuda'"):
        shard_factory("cuda", 0)
    try:
        import numba_kernels
    except ImportError:
        numba_kernels = None
    if numba_kernels is not None and hasattr(numba_kernels, "TPShard"):
        pytest.skip("numba_kernels.TPShard exists")
    with pytest.raises(ValueError, match="numba"):
        shard_factory("numba", 0)
