"""The central property: every policy returns, for every request, exactly the tokens
(and, for the fused step, bitwise the logits) that serial decoding returns."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover.clock import VirtualClock
from flover.engine import FusionEngine
from flover.policies import run_instances
from flover.runner import PolicyConfig, run_policy
from flover.testing import serial_outputs, traces
from flover.trace import poisson_trace
from reference import NumpyBackend
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def make_backend(small_model):
    config, weights = small_model
    return lambda n_slots: NumpyBackend(config, weights, n_slots)


TRACES = traces(SMALL.vocab_size, SMALL.n_ctx, max_requests=7)
POLICY = st.one_of(
    st.builds(PolicyConfig, policy=st.just("fused"), slots=st.integers(1, 6), shuffle=st.booleans()),
    st.builds(PolicyConfig, policy=st.just("dynamic"), max_batch=st.integers(1, 5),
              window_s=st.sampled_from([0.0, 1.0, 3.0])),  # fmt: skip
    st.builds(PolicyConfig, policy=st.just("instances"), instances=st.integers(1, 3)),
    st.just(PolicyConfig(policy="serial")),
)


@settings(max_examples=120)
@given(trace=TRACES, pc=POLICY)
def test_every_policy_returns_serial_tokens(make_backend, trace, pc):
    expected = serial_outputs(make_backend, trace)
    run = run_policy(pc, make_backend, trace, clock=VirtualClock())
    assert sorted(r.id for r in run.results) == sorted(expected), "each request exactly once"
    assert {r.id: r.tokens for r in run.results} == expected
    for r in run.results:
        assert r.arrival_s <= r.admitted_s <= r.first_token_s <= r.finish_s


@settings(max_examples=60)
@given(trace=TRACES, slots=st.integers(1, 6), shuffle=st.booleans())
def test_fused_logits_bitwise_equal_serial(make_backend, trace, slots, shuffle):
    serial = run_policy(PolicyConfig("serial"), make_backend, trace, clock=VirtualClock(), keep_logits=True)
    fused = run_policy(PolicyConfig("fused", slots=slots, shuffle=shuffle), make_backend, trace,
                       clock=VirtualClock(), keep_logits=True)  # fmt: skip
    truth = {r.id: r.logits for r in serial.results}
    for r in fused.results:
        assert len(r.logits) == len(truth[r.id])
        for step, (got, want) in enumerate(zip(r.logits, truth[r.id])):
            assert np.array_equal(got, want), f"request {r.id} token {step}: logits differ from serial"


@settings(max_examples=40)
@given(trace=TRACES, slots=st.integers(1, 6))
def test_slots_never_exceed_capacity_and_shuffle_keeps_tokens(make_backend, trace, slots):
    runs = {}
    for shuffle in (True, False):
        engine = FusionEngine(make_backend(slots), clock=VirtualClock(), shuffle=shuffle)
        runs[shuffle] = {r.id: r.tokens for r in engine.run(trace)}
        assert engine.stats.max_active <= slots
        assert all(step.batch <= step.width <= slots for step in engine.stats.steps)
        if shuffle:
            assert all(step.batch == step.width for step in engine.stats.steps), "shuffle keeps the window dense"
    assert runs[True] == runs[False]


def test_overload_completes_every_request_in_bounded_memory(make_backend):
    """Ten times more requests than slots, all at once: every one completes, FIFO."""
    slots = 3
    trace = poisson_trace(1e9, 30, (1, 12), (1, 12), seed=4, vocab_size=SMALL.vocab_size)
    backend = make_backend(slots)
    kv_bytes = backend.cache.k.nbytes + backend.cache.v.nbytes
    engine = FusionEngine(backend, clock=VirtualClock())
    results = engine.run(trace)
    assert sorted(r.id for r in results) == sorted(r.id for r in trace)
    assert engine.stats.max_active <= slots
    assert backend.cache.k.nbytes + backend.cache.v.nbytes == kv_bytes
    admitted = sorted(results, key=lambda r: r.admitted_s)
    assert [r.id for r in admitted] == sorted(r.id for r in trace), "admitted in arrival (FIFO) order"


@settings(max_examples=30)
@given(trace=TRACES, max_batch=st.integers(1, 5), window_s=st.sampled_from([0.0, 1.0, 3.0]))
def test_dynamic_batch_is_handed_back_when_its_longest_member_is_done(make_backend, trace, max_batch, window_s):
    """Streamed, a member finishes with its own last token; not streamed, the whole
    batch comes back together, at the finish of its longest member."""
    pc = PolicyConfig("dynamic", max_batch=max_batch, window_s=window_s)
    run = run_policy(pc, make_backend, trace, clock=VirtualClock())
    by_return: dict[float, list[float]] = {}
    for r in run.results:
        assert r.returned >= r.finish_s
        by_return.setdefault(r.returned, []).append(r.finish_s)
    assert all(max(finishes) == returned for returned, finishes in by_return.items())
    assert run.metrics["returned_latency_s"]["mean"] >= run.metrics["latency_s"]["mean"]
    assert run.metrics["wasted_lanes"] == sum(s.width - s.batch for s in run.stats.steps)


def test_instances_split_the_cores(make_backend):
    backends = [make_backend(1) for _ in range(2)]
    trace = poisson_trace(100.0, 4, (1, 4), (1, 4), seed=1, vocab_size=SMALL.vocab_size)
    results = run_instances(backends, trace)
    assert sorted(r.id for r in results) == sorted(r.id for r in trace)
    assert all(b.threads == max(1, (os.cpu_count() or 1) // 2) for b in backends)
