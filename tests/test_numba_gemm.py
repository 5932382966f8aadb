"""GEMM kernels: each equals NumPy, all equal each other bitwise, and dispatch follows its table.

Runs under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) at small shapes, and unmodified on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import cuda

from numba_kernels import dispatch
from numba_kernels.device import NO_CUDA, cuda_available
from numba_kernels.dispatch import Dispatch, default_variant, load_table, save_table
from numba_kernels.gemm import GEMV_K_CHUNK, Variant, launch
from numba_kernels.simulator import quick_switching

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

# one of each kernel, and tiles that leave partial tiles at these shapes; small blocks keep the simulator quick;
# staged chunks of 16 and 32 k (several chunks, the last one partial) and a GPU's 128 threads
VARIANTS = [
    ("naive", (32,)), ("tiled", (16, 32, 8, 2, 4)), ("tiled", (32, 32, 8, 4, 4)), ("tiled", (32, 16, 8, 4, 2)),
    ("gemv", (32, 1)), ("gemv", (32, 4)), ("gemv", (64, 8)),
    ("staged", (32, 8, 1, 32)), ("staged", (128, 4, 8, 32)),
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def random_gemm(m: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    return x, w, b


def run(variant, x, w, b) -> np.ndarray:
    out = cuda.to_device(np.full((x.shape[0], w.shape[1]), np.nan, np.float32))  # poisoned
    launch(variant, cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    return out.copy_to_host()


@pytest.mark.parametrize("kernel,params", VARIANTS)
def test_gemm_variant_matches_numpy(kernel, params):
    x, w, b = random_gemm(9, 37, 21, seed=sum(params))
    got = run(Variant(kernel, params), x, w, b)
    assert not np.isnan(got).any(), "an output element was never written"
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)


@settings(max_examples=3, derandomize=True)
@given(m=st.integers(1, 12), n=st.integers(1, 40), k=st.integers(1, 48), seed=st.integers(0, 2**16))
@example(m=3, n=5, k=GEMV_K_CHUNK + 9, seed=1)  # K longer than one chunk of the GEMV's staged x
def test_gemm_variants_bitwise_equal(m, n, k, seed):
    x, w, b = random_gemm(m, n, k, seed)
    results = {f"{kernel} {params}": run(Variant(kernel, params), x, w, b) for kernel, params in VARIANTS}
    first = next(iter(results.values()))
    assert not np.isnan(first).any()
    for name, got in results.items():
        assert np.array_equal(got, first), f"{name} differs from {VARIANTS[0]} at M={m} N={n} K={k}"


@pytest.mark.parametrize("m,n,k", [(9, 37, 21), (130, 20, 9)])
def test_prefetch_tiles_bitwise_equal_naive(m, n, k):
    """Version 5 (256 threads a block: few shapes under the simulator): partial tiles, 3 k tiles, 2 row tiles."""
    x, w, b = random_gemm(m, n, k, seed=m)
    got = run(Variant("prefetch", ()), x, w, b)
    assert not np.isnan(got).any()
    assert np.array_equal(got, run(Variant("naive", (32,)), x, w, b))


def test_default_tile_bitwise_equal_naive():
    x, w, b = random_gemm(13, 70, 19, seed=5)
    assert np.array_equal(run(default_variant(13, 70, 19), x, w, b), run(Variant("naive", (32,)), x, w, b))


def test_row_alone_equals_row_in_batch():
    """Batch invariance of the dispatched GEMM: a row alone (GEMV) equals that row among 11 others (tiled)."""
    x, w, b = random_gemm(12, 24, 17, seed=2)
    dispatch = Dispatch(table={})
    batch = cuda.to_device(np.full((12, 24), np.nan, np.float32))
    dispatch.gemm(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), batch)
    for row in (0, 7, 11):
        alone = cuda.to_device(np.full((1, 24), np.nan, np.float32))
        dispatch.gemm(cuda.to_device(x[row : row + 1]), cuda.to_device(w), cuda.to_device(b), alone)
        assert np.array_equal(alone.copy_to_host()[0], batch.copy_to_host()[row])


def test_default_rule_staged_gemv_for_few_rows_tiled_for_many(monkeypatch):
    monkeypatch.setattr(dispatch, "simulated", lambda: False)  # the rule for a GPU
    assert default_variant(1, 2304, 768) == Variant("staged", (128, 8, 1, 512))
    assert default_variant(5, 20, 768) == Variant("staged", (128, 8, 8, 256))
    assert default_variant(8, 768, 3072).kernel == "staged"
    assert default_variant(1, 96, 32) == Variant("staged", (128, 8, 1, 128)), "no chunk longer than K needs"
    assert default_variant(9, 768, 768) == Variant("tiled", (32, 32, 16, 4, 4))
    assert default_variant(1024, 768, 768) == Variant("prefetch", ())
    monkeypatch.setattr(dispatch, "simulated", lambda: True)  # fewer Python threads, the same chunks and sums
    assert default_variant(1, 2304, 768) == Variant("staged", (32, 8, 1, 512))
    assert default_variant(8, 96, 32) == Variant("staged", (64, 8, 8, 32))


def test_dispatch_takes_the_largest_tuned_batch_not_above(tmp_path):
    path = tmp_path / "tuning.json"
    table = {"1x96x32": Variant("gemv", (128, 1)), "16x96x32": Variant("tiled", (32, 32, 8, 4, 4))}
    save_table(table, "GPU A", path)
    save_table({"1x96x32": Variant("naive", (64,))}, "GPU B", path)
    assert load_table("GPU A", path) == table, "a device's entries survive another device's save"
    assert load_table("no such GPU", path) == {}
    dispatch = Dispatch(load_table("GPU A", path))
    assert dispatch.choose(1, 96, 32) == Variant("gemv", (128, 1))
    assert dispatch.choose(15, 96, 32) == Variant("gemv", (128, 1))
    assert dispatch.choose(64, 96, 32) == Variant("tiled", (32, 32, 8, 4, 4))
    assert dispatch.choose(64, 97, 32) == default_variant(64, 97, 32), "an untuned (N, K) takes the default rule"


def test_bad_shapes_and_kernel_names_are_refused():
    x, w, b = random_gemm(2, 3, 4, seed=0)
    out = cuda.device_array((2, 3), np.float32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        launch(Variant("naive", (32,)), cuda.to_device(x), cuda.to_device(w[:3]), cuda.to_device(b), out)
    with pytest.raises(ValueError, match="TM must divide BM"):
        launch(Variant("tiled", (32, 32, 8, 3, 4)), cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    with pytest.raises(ValueError, match="unknown gemm kernel"):
        launch(Variant("cublas", ()), cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    with pytest.raises(ValueError, match="multiples of the threads"):
        launch(Variant("staged", (128, 8, 1, 100)), cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    with pytest.raises(ValueError, match="shared memory"):
        launch(Variant("staged", (128, 8, 8, 1024)), cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    with pytest.raises(ValueError, match="runs no epilogue"):
        launch(Variant("naive", (32,)), cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out, epilogue="gelu")
