"""The central property: every scheduler, layout and prefill mode returns, for every request, exactly
serial decoding's tokens and, bit for bit, its logits; each request once; memory within its budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flover.clock import VirtualClock
from flover.engine import DynamicScheduler, FusedScheduler, PagedLayout, SerialScheduler, SlotLayout
from flover.runner import PolicyConfig, run_policy
from flover.testing import check_scheduler, serial_outputs, traces
from reference import NumpyBackend
from tests.conftest import SMALL, assert_first_free


@pytest.fixture(scope="module")
def make_backend(small_model):
    config, weights = small_model
    return lambda kv: NumpyBackend(config, weights, kv)


TRACES = traces(SMALL.vocab_size, SMALL.n_ctx, max_requests=7)
PREFILL = st.one_of(st.just(FusedScheduler("alone")), st.builds(FusedScheduler, st.just("chunked"), st.integers(1, 12)))


@settings(max_examples=80)
@given(trace=TRACES, scheduler=PREFILL, slots=st.integers(1, 6), shuffle=st.booleans())
def test_fused_on_slots_equals_serial(make_backend, trace, scheduler, slots, shuffle):
    check_scheduler(scheduler, lambda: SlotLayout(SMALL, slots, shuffle), make_backend, trace)


@settings(max_examples=80)
@given(trace=TRACES, scheduler=PREFILL, block_size=st.sampled_from([1, 3, 4, 16]), spare=st.integers(0, 12))
def test_fused_on_paged_blocks_equals_serial_even_when_preempted(make_backend, trace, scheduler, block_size, spare):
    """A pool just large enough for the largest request forces preemption and recomputation."""
    need = max(max(-(-len(r.prompt_ids) // block_size) + 1, -(-(len(r.prompt_ids) + r.max_new_tokens) // block_size))
               for r in trace)  # fmt: skip
    check_scheduler(scheduler, lambda: PagedLayout(SMALL, need + spare, block_size), make_backend, trace)


@settings(max_examples=40)
@given(trace=TRACES, max_batch=st.integers(1, 5), delay=st.sampled_from([0.0, 1.0, 3.0]))
def test_dynamic_batching_equals_serial(make_backend, trace, max_batch, delay):
    layout = lambda: SlotLayout(SMALL, max_batch, shuffle=False, pad_batch=True)  # noqa: E731
    check_scheduler(DynamicScheduler(max_batch, delay), layout, make_backend, trace)


@settings(max_examples=20)
@given(trace=TRACES)
def test_serial_scheduler_equals_serial(make_backend, trace):
    check_scheduler(SerialScheduler(), lambda: SlotLayout(SMALL, 1), make_backend, trace)


@settings(max_examples=30)
@given(trace=TRACES, instances=st.integers(1, 3))
def test_simulated_instances_return_serial_tokens(make_backend, trace, instances):
    run = run_policy(PolicyConfig("instances", instances=instances), make_backend, trace, clock=VirtualClock())
    assert sorted(r.id for r in run.results) == sorted(r.id for r in trace), "each request exactly once"
    assert {r.id: r.tokens for r in run.results} == serial_outputs(make_backend, trace)
    assert_first_free(run.results)


NUMBA_CONFIG = SMALL.with_(n_layer=1, n_embd=16, n_head=2, n_ctx=16)  # the CUDA simulator runs a thread per thread


@pytest.mark.skipif(not __import__("numba_kernels").cuda_available(), reason="no CUDA GPU and no simulator")
@settings(max_examples=2)
@given(trace=traces(NUMBA_CONFIG.vocab_size, NUMBA_CONFIG.n_ctx, min_requests=3, max_requests=3, max_new_tokens=3,
                    max_prompt=3, max_arrival=2),
       scheduler=st.sampled_from([FusedScheduler("alone"), FusedScheduler("chunked", 3)]), shuffle=st.booleans())
def test_fused_on_the_numba_backend_equals_its_serial(trace, scheduler, shuffle):
    from numba_kernels import NumbaBackend
    from numba_kernels.simulator import quick_switching
    from reference import init_weights

    weights = init_weights(NUMBA_CONFIG, seed=1, std=0.3)
    with quick_switching():
        check_scheduler(scheduler, lambda: SlotLayout(NUMBA_CONFIG, 2, shuffle),
                        lambda kv: NumbaBackend(NUMBA_CONFIG, weights, kv), trace)  # fmt: skip
