"""A request's logits in a batched decode step are bitwise those it gets alone."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import NumpyBackend


def filled_backend(config, weights, n_slots, lengths, seed):
    """A backend whose slots hold random prompts of the given lengths."""
    backend = NumpyBackend(config, weights, n_slots)
    rng = np.random.default_rng(seed)
    for slot, n in enumerate(lengths):
        backend.prefill(slot, rng.integers(0, config.vocab_size, size=n))
    return backend


@settings(max_examples=40)
@given(data=st.data())
def test_decode_rows_bitwise_equal_solo(small_model, data):
    config, weights = small_model
    n_slots = data.draw(st.integers(1, 16), label="slots")
    lengths = data.draw(st.lists(st.integers(1, config.n_ctx - 1), min_size=n_slots, max_size=n_slots))
    size = data.draw(st.integers(1, n_slots), label="batch")
    slots = np.array(data.draw(st.permutations(range(n_slots)))[:size])
    tokens = np.array(data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=size, max_size=size)))
    positions = np.array([lengths[s] for s in slots])
    batched = filled_backend(config, weights, n_slots, lengths, seed=7).decode(slots, tokens, positions)
    for row, slot in enumerate(slots):
        alone = filled_backend(config, weights, n_slots, lengths, seed=7)
        solo = alone.decode(slots[row : row + 1], tokens[row : row + 1], positions[row : row + 1])
        assert np.array_equal(solo[0], batched[row]), f"row {row} (slot {slot}) changed in a batch of {size}"


def test_blas_decode_is_not_batch_invariant_here(small_model):
    """Why the invariant kernels exist: BLAS's 1-row matmul sums in another order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 768), dtype=np.float32)
    w = rng.standard_normal((768, 2304), dtype=np.float32)
    differ = np.count_nonzero((x[:1] @ w)[0] != (x @ w)[0])
    assert differ > 0, "this BLAS happens to be batch invariant for this shape"


def test_decode_matches_prefill_logits(small_model):
    """Decoding token t at position t gives the logits a longer prefill gives (to rounding)."""
    config, weights = small_model
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=20)
    backend = NumpyBackend(config, weights, 2)
    backend.prefill(0, tokens[:-1])
    stepped = backend.decode(np.array([0]), tokens[-1:], np.array([len(tokens) - 1]))[0]
    whole = backend.prefill(1, tokens)
    np.testing.assert_allclose(stepped, whole, rtol=1e-4, atol=1e-4)
