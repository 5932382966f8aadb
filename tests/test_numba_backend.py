"""NumbaBackend: a drop-in for the NumPy backend, batch invariant bitwise, equal to NumPy to rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import numba_kernels
from flover.clock import VirtualClock
from flover.request import Request
from flover.runner import PolicyConfig, run_policy
from flover.testing import traces
from numba_kernels import NO_CUDA, NoCudaError, NumbaBackend, cuda_available
from numba_kernels.simulator import quick_switching
from reference import GPTConfig, NumpyBackend, generate, init_weights
from reference.backend import Backend

needs_cuda = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

# smaller than tests/conftest.py's SMALL: the simulator's cost is a Python thread per GPU thread
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_ctx=32)


@pytest.fixture(scope="module")
def small_model():
    return CONFIG, init_weights(CONFIG, seed=1, std=0.3)


@pytest.fixture(scope="module")
def one_layer():
    """For the properties of batching and slots, which one layer shows as well as two, at half the cost."""
    config = CONFIG.with_(n_layer=1)
    return config, init_weights(config, seed=1, std=0.3)


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def filled(backend, prompts: dict[int, list[int]]):
    """The backend with each slot's prompt prefilled; -> (backend, prefill logits by slot)."""
    return backend, {slot: backend.prefill(slot, np.array(p)) for slot, p in prompts.items()}


def test_require_cuda_names_what_is_missing(monkeypatch, small_model):
    monkeypatch.setattr(numba_kernels.device, "cuda_available", lambda: False)
    with pytest.raises(NoCudaError, match="^no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set$"):
        numba_kernels.require_cuda()
    with pytest.raises(NoCudaError):
        NumbaBackend(*small_model)


@needs_cuda
def test_numba_backend_is_a_backend(small_model):
    backend = NumbaBackend(*small_model, n_slots=3)
    assert isinstance(backend, Backend)
    assert backend.n_slots == 3 and backend.config == CONFIG


@needs_cuda
def test_logits_close_to_numpy_and_greedy_tokens_equal(small_model):
    config, weights = small_model
    prompt = [5, 17, 63, 0, 42]
    gpu, cpu = NumbaBackend(config, weights), NumpyBackend(config, weights)
    np.testing.assert_allclose(gpu.prefill(0, np.array(prompt)), cpu.prefill(0, np.array(prompt)), atol=1e-4, rtol=1e-4)
    args = np.array([0]), np.array([3]), np.array([len(prompt)])
    np.testing.assert_allclose(gpu.decode(*args), cpu.decode(*args), atol=1e-4, rtol=1e-4)
    assert list(generate(gpu, [1, 2, 3], 5)) == list(generate(cpu, [1, 2, 3], 5))


@needs_cuda
@settings(max_examples=2, derandomize=True)
@given(data=st.data())
def test_decode_rows_bitwise_equal_solo(one_layer, data):
    config, weights = one_layer
    n_slots = data.draw(st.integers(2, 3), label="slots")
    token = st.integers(0, config.vocab_size - 1)
    prompts = {s: data.draw(st.lists(token, min_size=1, max_size=4)) for s in range(n_slots)}
    size = data.draw(st.integers(2, n_slots), label="batch")
    slots = np.array(data.draw(st.permutations(range(n_slots)))[:size])
    tokens = np.array(data.draw(st.lists(token, min_size=size, max_size=size)))
    positions = np.array([len(prompts[s]) for s in slots])
    backend, _ = filled(NumbaBackend(config, weights, n_slots), prompts)
    batched = backend.decode(slots, tokens, positions)
    for row in range(size):  # decoding a row again rewrites the same K and V at the same position
        solo = backend.decode(slots[row : row + 1], tokens[row : row + 1], positions[row : row + 1])
        assert np.array_equal(solo[0], batched[row]), f"row {row} (slot {slots[row]}) changed in a batch of {size}"


@needs_cuda
def test_prefill_rows_equal_decode_rows(one_layer):
    """Nine tokens prefilled (tiled GEMMs) give bitwise the logits of eight prefilled (GEMV, 8 rows per
    thread) and the ninth decoded (GEMV, 1 row)."""
    prompt = [4, 8, 15, 16, 23, 42, 7, 1, 60]
    whole = NumbaBackend(*one_layer).prefill(0, np.array(prompt))
    stepped = NumbaBackend(*one_layer)
    stepped.prefill(0, np.array(prompt[:-1]))
    last = stepped.decode(np.array([0]), np.array(prompt[-1:]), np.array([len(prompt) - 1]))[0]
    assert np.array_equal(whole, last)


@needs_cuda
def test_moved_slot_decodes_as_if_it_had_been_there(one_layer):
    prompts = {1: [9, 9, 2], 3: [33, 1, 60, 5]}
    moved, _ = filled(NumbaBackend(*one_layer, n_slots=4), prompts)
    moved.move_slots(np.array([3]), np.array([0]), np.array([4]))
    assert moved.cached_lengths().tolist()[:2] == [4, 3], "the slot's state moved with it"
    direct, _ = filled(NumbaBackend(*one_layer, n_slots=4), {0: prompts[3], 1: prompts[1]})
    args = np.array([0, 1]), np.array([12, 13]), np.array([4, 3])
    assert np.array_equal(moved.decode(*args), direct.decode(*args))


# all arrive at once; request 1 finishes first and opens a hole in slot 1, which slot 2 moves into
HOLE_TRACE = [Request(0, 0.0, (3, 1, 4), 3), Request(1, 0.0, (1,), 2), Request(2, 0.0, (9, 2), 3)]


@needs_cuda
@settings(max_examples=1, derandomize=True)
@given(trace=traces(CONFIG.vocab_size, n_ctx=10, max_requests=3, max_arrival=3, max_new_tokens=3))
@example(trace=HOLE_TRACE)
def test_fused_engine_on_numba_equals_serial_bitwise(one_layer, trace):
    """Temporal fusion with the memory shuffle on this backend: every request's tokens and logits are serial's."""
    make = lambda n: NumbaBackend(*one_layer, n_slots=n)  # noqa: E731
    serial = run_policy(PolicyConfig("serial"), make, trace, clock=VirtualClock(), keep_logits=True)
    fused = run_policy(PolicyConfig("fused", slots=3), make, trace, clock=VirtualClock(), keep_logits=True)
    if trace == HOLE_TRACE:
        assert fused.stats.moves > 0, "this trace opens a hole the shuffle closes"
    truth = {r.id: r for r in serial.results}
    for r in fused.results:
        assert r.tokens == truth[r.id].tokens
        assert all(np.array_equal(a, b) for a, b in zip(r.logits, truth[r.id].logits, strict=True))


@needs_cuda
def test_bad_requests_name_the_value_and_the_limit(small_model):
    backend = NumbaBackend(*small_model, n_slots=2)
    with pytest.raises(ValueError, match="slot out of range 0..1"):
        backend.prefill(2, np.array([1]))
    with pytest.raises(ValueError, match="1..32 tokens"):
        backend.prefill(0, np.zeros(33, np.int64))
    with pytest.raises(ValueError, match="token ids must be in 0..63"):
        backend.prefill(0, np.array([64]))
    with pytest.raises(ValueError, match="positions must be in 0..31"):
        backend.decode(np.array([0]), np.array([1]), np.array([32]))
    with pytest.raises(ValueError, match="each slot once"):
        backend.decode(np.array([1, 1]), np.array([1, 2]), np.array([3, 3]))
