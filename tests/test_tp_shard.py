"""Sharding, the STEP command's payload and the rank-0 backend in one process (a world of one rank, or shards
side by side). What every backend keeps, TP over one rank included, is in ``tests/test_backend_contract.py``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from mpi_tp import check_world, launch, shard_weights, vocab_bounds  # noqa: E402
from mpi_tp.backend import payload_rows, payload_shape, rows_payload, shard_factory  # noqa: E402
from reference import GPTConfig, KVShape, Lane, init_weights, plan_rows, preset  # noqa: E402

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


@settings(max_examples=30)
@given(data=st.data())
def test_step_payload_decodes_to_the_rows_it_encodes(data):
    """The STEP command carries a step's rows to every rank: any lanes, any block size."""
    block_size = data.draw(st.sampled_from([1, 5, 16, 64]))
    kv = KVShape(8 * -(-CONFIG.n_ctx // block_size), block_size)
    ids = iter(data.draw(st.permutations(range(kv.n_blocks))))
    lanes = []
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, CONFIG.n_ctx - 1))
        tokens = data.draw(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=CONFIG.n_ctx - start))
        lanes.append(Lane.of([next(ids) for _ in range(-(-(start + len(tokens)) // block_size))], tokens, start))
    rows = plan_rows(CONFIG, kv, lanes)
    header, payload = rows_payload(rows)
    assert payload.shape == payload_shape(header)
    got = payload_rows(header, payload.copy(), block_size)
    for name in ("tokens", "positions", "lane", "block_table", "last", "blocks", "offsets"):
        assert np.array_equal(getattr(got, name), getattr(rows, name)), name


def test_closed_backend_refuses_to_step():
    tp = launch(CONFIG, init_weights(CONFIG), 2, comm=MPI.COMM_SELF)
    assert tp.comm_seconds().shape == (1,)
    tp.close()
    with pytest.raises(RuntimeError, match="closed"):
        tp.prefill(0, np.array([1]))


def test_inner_backends_are_named_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown tensor-parallel inner backend 'cuda'"):
        shard_factory("cuda", 0)
    numba_kernels = pytest.importorskip("numba_kernels")
    if numba_kernels.cuda_available():
        assert shard_factory("numba", 0) is numba_kernels.TPShard
    monkeypatch.setattr(numba_kernels.device, "cuda_available", lambda: False)
    with pytest.raises(numba_kernels.NoCudaError, match="no CUDA GPU"):
        shard_factory("numba", 0)
