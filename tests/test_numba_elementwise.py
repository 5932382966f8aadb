"""Element-wise kernels (embedding, layer norm, GELU, residual add, row gather) against NumPy, on poisoned outputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import cuda

from numba_kernels import elementwise as ew
from numba_kernels.device import NO_CUDA, cuda_available
from numba_kernels.simulator import quick_switching
from reference import ops

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def poisoned(shape) -> cuda.devicearray.DeviceNDArray:
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def written(out) -> np.ndarray:
    got = out.copy_to_host()
    assert not np.isnan(got).any(), "an output element was never written"
    return got


@settings(max_examples=3, derandomize=True)
@given(rows=st.integers(1, 4), width=st.integers(1, 300), seed=st.integers(0, 2**16))
@example(rows=2, width=300, seed=0)  # 256 threads: tree levels, then the serial tail of 32
def test_layer_norm_matches_numpy(rows, width, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, width), dtype=np.float32) * 3 + 1).astype(np.float32)
    g, b = rng.standard_normal(width, dtype=np.float32), rng.standard_normal(width, dtype=np.float32)
    want = ops.layer_norm(x, g, b, 1e-5)
    for kernel in LAYER_NORMS:
        out = poisoned((rows, width))
        ew.layer_norm(cuda.to_device(x), cuda.to_device(g), cuda.to_device(b), 1e-5, out, kernel=kernel)
        np.testing.assert_allclose(written(out), want, rtol=1e-4, atol=1e-4)


LAYER_NORMS = [ew.layer_norm_kernel, ew.layer_norm_tree_kernel]


@pytest.mark.parametrize("kernel", LAYER_NORMS, ids=["v1", "v2"])
def test_layer_norm_row_alone_equals_row_in_batch(kernel):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 70), dtype=np.float32)
    g, b = cuda.to_device(np.ones(70, np.float32)), cuda.to_device(np.zeros(70, np.float32))
    batch = ew.layer_norm(cuda.to_device(x), g, b, 1e-5, poisoned((5, 70)), kernel=kernel).copy_to_host()
    alone = ew.layer_norm(cuda.to_device(x[3:4]), g, b, 1e-5, poisoned((1, 70)), kernel=kernel).copy_to_host()
    assert np.array_equal(alone[0], batch[3])


def test_layer_norm_launches_the_tree_version():
    """A 100-wide row whose sum rounds differently in v1's thread order and in v2's tree: the default is v2."""
    x = np.float32([[3.0e7, 1.0, -3.0e7] + [0.5] * 97])
    one, zero = cuda.to_device(np.ones(100, np.float32)), cuda.to_device(np.zeros(100, np.float32))
    runs = {k: ew.layer_norm(cuda.to_device(x), one, zero, 1e-5, poisoned((1, 100)), kernel=k).copy_to_host()
            for k in (None, ew.layer_norm_tree_kernel, ew.layer_norm_kernel)}
    assert np.array_equal(runs[None], runs[ew.layer_norm_tree_kernel])
    assert not np.array_equal(runs[None], runs[ew.layer_norm_kernel])


def test_gelu_matches_numpy_in_place():
    x = np.random.default_rng(2).standard_normal((3, 45), dtype=np.float32) * 4
    buf = cuda.to_device(x)
    ew.gelu(buf, buf)
    np.testing.assert_allclose(written(buf), ops.gelu(x), rtol=1e-5, atol=1e-6)


def test_gelu_writes_every_element():
    x = np.random.default_rng(3).standard_normal((2, 33), dtype=np.float32)
    out = poisoned((2, 33))
    ew.gelu(cuda.to_device(x), out)
    np.testing.assert_allclose(written(out), ops.gelu(x), rtol=1e-5, atol=1e-6)


def test_residual_add_matches_numpy():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((3, 40), dtype=np.float32), rng.standard_normal((3, 40), dtype=np.float32)
    buf = cuda.to_device(x)
    ew.residual_add(buf, cuda.to_device(y))
    assert np.array_equal(written(buf), x + y)


def test_embedding_is_token_row_plus_position_row():
    rng = np.random.default_rng(5)
    wte, wpe = rng.standard_normal((50, 24), dtype=np.float32), rng.standard_normal((16, 24), dtype=np.float32)
    tokens, positions = np.array([3, 49, 0, 3]), np.array([0, 15, 7, 2])
    out = poisoned((4, 24))
    ew.embed(cuda.to_device(tokens.astype(np.int32)), cuda.to_device(positions.astype(np.int32)),
             cuda.to_device(wte), cuda.to_device(wpe), out)  # fmt: skip
    assert np.array_equal(written(out), wte[tokens] + wpe[positions])


def test_take_rows_gathers_the_named_rows():
    x = np.random.default_rng(6).standard_normal((6, 40), dtype=np.float32)
    rows = np.array([5, 0, 2])
    out = poisoned((3, 40))
    ew.take_rows(cuda.to_device(x), cuda.to_device(rows.astype(np.int32)), out)
    assert np.array_equal(written(out), x[rows])
