"""Fused epilogues: a GEMM that adds the residual, applies GELU or stores K and V in the same launch gives
bitwise what the GEMM and the separate kernel give; and so does the whole backend."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from numba_kernels import NumbaBackend
from numba_kernels import elementwise as ew
from numba_kernels.attention import store_kv
from numba_kernels.device import NO_CUDA, cuda_available
from numba_kernels.dispatch import Dispatch, shape_key
from numba_kernels.gemm import Variant, launch
from numba_kernels.simulator import quick_switching
from reference import GPTConfig, Lane, init_weights

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

NAIVE = Variant("naive", (32,))
STAGED = [Variant("staged", (32, 8, 2, 16)), Variant("staged", (128, 8, 4, 32))]  # the simulator's and a GPU's size
N_SLOTS, N_HEAD, N_CTX, D = 4, 2, 8, 4
C = N_HEAD * D


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def gemm_inputs(m: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32),
            rng.standard_normal(n, dtype=np.float32))  # fmt: skip


def up(*arrays):
    return [cuda.to_device(a) for a in arrays]


@pytest.mark.parametrize("variant", STAGED, ids=str)
def test_residual_epilogue_equals_gemm_then_residual_add(variant):
    a, w, b = gemm_inputs(3, 20, 37, seed=1)
    x0 = np.random.default_rng(2).standard_normal((3, 20), dtype=np.float32)
    fused = cuda.to_device(x0)
    launch(variant, *up(a, w, b), fused, epilogue="residual")
    y, x = cuda.to_device(np.full((3, 20), np.nan, np.float32)), cuda.to_device(x0)
    launch(NAIVE, *up(a, w, b), y)
    ew.residual_add(x, y)
    assert np.array_equal(fused.copy_to_host(), x.copy_to_host())


@pytest.mark.parametrize("variant", STAGED, ids=str)
def test_gelu_epilogue_equals_gemm_then_gelu(variant):
    a, w, b = gemm_inputs(5, 33, 19, seed=3)
    fused, f = (cuda.to_device(np.full((5, 33), np.nan, np.float32)) for _ in range(2))
    launch(variant, *up(a, w, b), fused, epilogue="gelu")
    launch(NAIVE, *up(a, w, b), f)
    ew.gelu(f, f)
    assert np.array_equal(fused.copy_to_host(), f.copy_to_host())


@pytest.mark.parametrize("variant", STAGED, ids=str)
def test_kv_epilogue_equals_gemm_then_kv_store(variant):
    """Rows of one prompt share a slot (its length recorded once, by its last row) beside a decode row."""
    a, w, b = gemm_inputs(4, 3 * C, 11, seed=4)
    slots, positions = np.array([2, 2, 2, 0], np.int32), np.array([0, 1, 2, 5], np.int32)

    def caches():
        k = cuda.to_device(np.zeros((N_SLOTS, N_HEAD, N_CTX, D), np.float32))
        return k, cuda.to_device(np.zeros_like(k.copy_to_host())), cuda.to_device(np.zeros(N_SLOTS, np.int32))

    fused_qkv = cuda.to_device(np.full((4, 3 * C), np.nan, np.float32))
    fk, fv, f_lengths = caches()
    launch(variant, *up(a, w, b), fused_qkv, epilogue="kv", aux=(fk, fv, *up(slots, positions), f_lengths))
    qkv = cuda.to_device(np.full((4, 3 * C), np.nan, np.float32))
    k, v, lengths = caches()
    launch(NAIVE, *up(a, w, b), qkv)
    store_kv(qkv, k, v, *up(slots, positions), lengths)
    for got, want in ((fused_qkv, qkv), (fk, k), (fv, v), (f_lengths, lengths)):
        assert np.array_equal(got.copy_to_host(), want.copy_to_host())
    assert f_lengths.copy_to_host().tolist() == [6, 0, 3, 0]


def test_backend_with_fused_epilogues_equals_backend_with_separate_kernels():
    """The backend's default (staged GEMV for a decode, epilogues fused) against a table that sends every GEMM to
    version 3, which fuses nothing: a prompt and then a decode step of two lanes, logits bitwise equal."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_ctx=8)
    weights = init_weights(config, seed=5, std=0.3)
    c, m = config.n_embd, config.d_mlp
    unfused = {shape_key(1, n, k): Variant("gemv", (32, 1)) for n, k in ((3 * c, c), (c, c), (m, c), (c, m), (40, c))}
    logits = []
    for dispatch in (Dispatch(table={}), Dispatch(table=unfused)):
        backend = NumbaBackend(config, weights, n_slots=3, dispatch=dispatch)
        prompt = backend.step([Lane.of([0], [3, 1, 4], 0)])
        step = backend.step([Lane.of([0], [1], 3), Lane.of([2], [5, 9], 0)])
        logits.append(np.concatenate([prompt, step]))
    assert np.array_equal(logits[0], logits[1])
