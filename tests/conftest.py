"""Shared fixtures: small GPT-2s and Hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from reference import GPTConfig, init_weights

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_ctx=64)


@pytest.fixture(scope="session")
def small_model():
    """A small random GPT-2 whose weights are large enough that greedy tokens vary."""
    return SMALL, init_weights(SMALL, seed=1, std=0.3)
