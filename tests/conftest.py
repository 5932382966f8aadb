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


def assert_first_free(results, slack_s: float = 0.0) -> None:
    """Instances served from one first-come-first-served queue by whichever is free first (Triton's default
    scheduler over an instance group): requests start in the order they arrive, and a request that waited found
    every instance busy from its arrival until it started. ``slack_s``: what the router's messages may take."""
    for r in results:
        for q in results:
            if q.arrival_s < r.arrival_s:
                assert q.admitted_s <= r.admitted_s + slack_s, f"request {r.id} started before {q.id}, which came first"
        for instance in {q.instance for q in results}:
            busy = sorted((q.admitted_s, q.finish_s) for q in results if q.instance == instance and q is not r)
            covered = r.arrival_s  # how far from its arrival this instance was busy without a break
            for start, end in busy:
                if start <= covered + slack_s:
                    covered = max(covered, end)
            assert covered >= r.admitted_s - slack_s, (
                f"request {r.id} waited from {r.arrival_s:.4f} s to {r.admitted_s:.4f} s while instance {instance} "
                f"was free from {covered:.4f} s"
            )
