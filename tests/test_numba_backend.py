"""NumbaBackend: a drop-in for the NumPy backend, batch invariant bitwise, equal to NumPy to rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numba_kernels
from numba_kernels import NO_CUDA, NoCudaError, NumbaBackend, cuda_available
from numba_kernels.device import quick_switching
from reference import NumpyBackend, generate
from reference.backend import Backend
from tests.conftest import SMALL

needs_cuda = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)


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
    assert backend.n_slots == 3 and backend.config == SMALL


@needs_cuda
def test_logits_close_to_numpy_and_greedy_tokens_equal(small_model):
    config, weights = small_model
    prompt = [5, 17, 96, 0, 42]
    gpu, cpu = NumbaBackend(config, weights), NumpyBackend(config, weights)
    np.testing.assert_allclose(gpu.prefill(0, np.array(prompt)), cpu.prefill(0, np.array(prompt)), atol=1e-4, rtol=1e-4)
    for position, token in enumerate([3, 77], start=len(prompt)):
        args = np.array([0]), np.array([token]), np.array([position])
        np.testing.assert_allclose(gpu.decode(*args), cpu.decode(*args), atol=1e-4, rtol=1e-4)
    for prompt in ([1, 2, 3], [60]):
        tokens = list(generate(NumbaBackend(config, weights), prompt, 6))
        assert tokens == list(generate(NumpyBackend(config, weights), prompt, 6))


@needs_cuda
@settings(max_examples=2, derandomize=True)
@given(data=st.data())
def test_decode_rows_bitwise_equal_solo(small_model, data):
    config, weights = small_model
    n_slots = data.draw(st.integers(2, 4), label="slots")
    token = st.integers(0, config.vocab_size - 1)
    prompts = {s: data.draw(st.lists(token, min_size=1, max_size=6)) for s in range(n_slots)}
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
def test_prefill_equals_decoding_the_prompt_token_by_token(small_model):
    """Ten tokens: the prefill's GEMMs take the tiled kernel, the decode steps the GEMV; bitwise equal."""
    prompt = [4, 8, 15, 16, 23, 42, 7, 1, 90, 3]
    whole = NumbaBackend(*small_model).prefill(0, np.array(prompt))
    stepped = NumbaBackend(*small_model)
    logits = stepped.prefill(0, np.array(prompt[:1]))
    for position in range(1, len(prompt)):
        logits = stepped.decode(np.array([0]), np.array([prompt[position]]), np.array([position]))[0]
    assert np.array_equal(whole, logits)


@needs_cuda
def test_moved_slot_decodes_as_if_it_had_been_there(small_model):
    prompts = {1: [9, 9, 2], 3: [33, 1, 70, 5]}
    moved, _ = filled(NumbaBackend(*small_model, n_slots=4), prompts)
    moved.move_slots(np.array([3]), np.array([0]), np.array([4]))
    assert moved.cached_lengths().tolist()[:2] == [4, 3], "the slot's state moved with it"
    direct, _ = filled(NumbaBackend(*small_model, n_slots=4), {0: prompts[3], 1: prompts[1]})
    args = np.array([0, 1]), np.array([12, 13]), np.array([4, 3])
    assert np.array_equal(moved.decode(*args), direct.decode(*args))


@needs_cuda
def test_fused_engine_on_numba_equals_serial_bitwise(small_model):
    """Temporal fusion with the memory shuffle on this backend: every request's tokens and logits are serial's."""
    from flover.clock import VirtualClock
    from flover.request import Request
    from flover.runner import PolicyConfig, run_policy

    trace = [Request(0, 0.0, (3, 1, 4), 5), Request(1, 1.0, (1, 5), 2), Request(2, 2.0, (9, 2, 6, 5), 3)]
    make = lambda n: NumbaBackend(*small_model, n_slots=n)  # noqa: E731
    serial = run_policy(PolicyConfig("serial"), make, trace, clock=VirtualClock(), keep_logits=True)
    fused = run_policy(PolicyConfig("fused", slots=3), make, trace, clock=VirtualClock(), keep_logits=True)
    assert fused.stats.moves > 0, "the trace should open a hole the shuffle closes"
    truth = {r.id: r for r in serial.results}
    for r in fused.results:
        assert r.tokens == truth[r.id].tokens
        assert all(np.array_equal(a, b) for a, b in zip(r.logits, truth[r.id].logits, strict=True))


@needs_cuda
def test_bad_requests_name_the_value_and_the_limit(small_model):
    backend = NumbaBackend(*small_model, n_slots=2)
    with pytest.raises(ValueError, match="slot out of range 0..1"):
        backend.prefill(2, np.array([1]))
    with pytest.raises(ValueError, match="1..64 tokens"):
        backend.prefill(0, np.zeros(65, np.int64))
    with pytest.raises(ValueError, match="token ids must be in 0..96"):
        backend.prefill(0, np.array([97]))
    with pytest.raises(ValueError, match="positions must be in 0..63"):
        backend.decode(np.array([0]), np.array([1]), np.array([64]))
    with pytest.raises(ValueError, match="each slot once"):
        backend.decode(np.array([1, 1]), np.array([1, 2]), np.array([3, 3]))
