"""Sampling: greedy, temperature, top-k, top-p, seeded per request; stop ids."""

from __future__ import annotations

import numpy as np
import pytest

from reference import NumpyBackend, Sampler, SamplingParams, generate
from reference.sampling import probabilities


def test_seeded_sampling_reproduces(small_model):
    config, weights = small_model
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11)
    first = list(generate(NumpyBackend(config, weights), [1, 2, 3], 30, params))
    second = list(generate(NumpyBackend(config, weights), [1, 2, 3], 30, params))
    other = list(generate(NumpyBackend(config, weights), [1, 2, 3], 30, SamplingParams(0.9, 20, 0.9, seed=12)))
    assert first == second
    assert first != other


def test_top_k_keeps_k_most_likely():
    logits = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(np.flatnonzero(p)) == {1, 3}
    assert p.sum() == pytest.approx(1.0)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert set(np.flatnonzero(probabilities(logits, SamplingParams(1.0, top_p=0.7)))) == {0, 1}
    assert set(np.flatnonzero(probabilities(logits, SamplingParams(1.0, top_p=0.5)))) == {0}


def test_sampled_frequencies_follow_probabilities():
    logits = np.log(np.array([0.6, 0.3, 0.1], np.float32))
    sample = Sampler(SamplingParams(temperature=1.0, seed=5))
    counts = np.bincount([sample(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.03)


def test_greedy_makes_no_draw():
    sample = Sampler(SamplingParams())
    state = sample.rng.bit_generator.state
    assert sample(np.array([0.0, 2.0, 1.0])) == 1
    assert sample.rng.bit_generator.state == state


def test_stop_id_ends_generation_and_is_returned(small_model):
    config, weights = small_model
    free = list(generate(NumpyBackend(config, weights), [5, 6], 20))
    stop = free[3]
    stopped = list(generate(NumpyBackend(config, weights), [5, 6], 20, stop_ids=[stop]))
    assert stopped == free[: free.index(stop) + 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ],
)
def test_bad_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingParams(**kwargs)
