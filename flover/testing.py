"""Hypothesis strategies for traces and slot maps, the serial ground truth, and a check for your own scheduler.

Import them to test your own scheduler the way flover tests its own::

    from hypothesis import given
    from flover.testing import check_scheduler, traces

    @given(traces(vocab_size=97, n_ctx=64))
    def test_my_scheduler(trace):
        check_scheduler(MyScheduler(), lambda: SlotLayout(config, 4), make_backend, trace)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from hypothesis import strategies as st

from flover.clock import VirtualClock
from flover.engine import Engine, KVLayout, Request, RequestResult, Scheduler
from reference import KVShape, SamplingParams, generate
from reference.backend import Backend


@st.composite
def requests(draw, id: int | str, vocab_size: int, n_ctx: int, max_arrival: float = 20.0,
             max_new_tokens: int = 12, sampled: bool = True, max_prompt: int = 16) -> Request:  # fmt: skip
    """One request that fits the model: a prompt, an output length, greedy or seeded sampling, stops."""
    prompt_len = draw(st.integers(1, max(1, min(max_prompt, n_ctx - 2))))
    new = draw(st.integers(1, max(1, min(max_new_tokens, n_ctx - prompt_len))))
    token = st.integers(0, vocab_size - 1)
    arrival = draw(st.integers(0, int(max_arrival))) / 1.0  # whole steps of the virtual clock: ties are likely
    kind = draw(st.sampled_from(["greedy", "sampled"] if sampled else ["greedy"]))
    sampling = SamplingParams()
    if kind == "sampled":
        sampling = SamplingParams(
            temperature=draw(st.sampled_from([0.5, 1.0, 1.5])),
            top_k=draw(st.sampled_from([0, 1, 5, 40])),
            top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
            seed=draw(st.integers(0, 2**31 - 1)),
        )
    stops = tuple(draw(st.lists(token, max_size=3)))
    prompt = tuple(draw(st.lists(token, min_size=prompt_len, max_size=prompt_len)))
    return Request(id, arrival, prompt, new, sampling, stops)


@st.composite
def traces(draw, vocab_size: int, n_ctx: int, min_requests: int = 1, max_requests: int = 8,
           max_arrival: float = 20.0, max_new_tokens: int = 12, sampled: bool = True,
           max_prompt: int = 16) -> list[Request]:  # fmt: skip
    """A list of requests with distinct ids and arrival times in virtual-clock steps."""
    n = draw(st.integers(min_requests, max_requests))
    return [draw(requests(i, vocab_size, n_ctx, max_arrival, max_new_tokens, sampled, max_prompt)) for i in range(n)]


def slot_maps(max_slots: int = 24) -> st.SearchStrategy[list[bool]]:
    """Which slots of a KV cache are active."""
    return st.lists(st.booleans(), min_size=1, max_size=max_slots)


def serial_outputs(make_backend: Callable[[int], Backend], trace: Sequence[Request]) -> dict:
    """The ground truth: each request decoded alone by ``reference.generate``; id -> tokens."""
    backend = make_backend(1)
    return {r.id: list(generate(backend, r.prompt_ids, r.max_new_tokens, r.sampling, r.stop_ids)) for r in trace}


def serial_logits(make_backend: Callable[[int], Backend], trace: Sequence[Request]) -> dict:
    """Each request decoded alone, prompt then one token at a time; id -> [logits of every sampled token]."""
    from flover.engine import SerialScheduler, SlotLayout

    backend = make_backend(1)
    engine = Engine(backend, SerialScheduler(), SlotLayout(backend.config, 1), VirtualClock(), keep_logits=True)
    return {r.id: r.logits for r in engine.run(trace)}


def check_scheduler(scheduler: Scheduler, make_layout: Callable[[], KVLayout],
                    make_backend: Callable[[int | KVShape], Backend], trace: Sequence[Request],
                    clock=None) -> list[RequestResult]:  # fmt: skip
    """Run ``trace`` under ``scheduler`` and assert the properties every policy must keep:

    - each request is handed back exactly once;
    - its tokens are serial decoding's, and the logits of every token are serial's bit for bit;
    - its timestamps are in order (arrival <= admitted <= first token <= finish);
    - the KV memory held never exceeds the layout's budget.

    Returns the results, for assertions of your own.
    """
    layout = make_layout()
    backend = make_backend(layout.shape)
    engine = Engine(backend, scheduler, layout, clock or VirtualClock(), keep_logits=True)
    results = engine.run(trace)
    ids = sorted(str(r.id) for r in results)
    assert ids == sorted(str(r.id) for r in trace), f"each request exactly once: got {ids}"
    truth = serial_outputs(make_backend, trace)
    logits = serial_logits(make_backend, trace)
    for r in results:
        assert r.tokens == truth[r.id], f"request {r.id!r}: tokens {r.tokens} differ from serial {truth[r.id]}"
        for i, (got, want) in enumerate(zip(r.logits, logits[r.id], strict=True)):
            assert np.array_equal(got, want), f"request {r.id!r} token {i}: logits differ from serial"
        assert r.arrival_s <= r.admitted_s <= r.first_token_s <= r.finish_s, f"request {r.id!r}: timestamps out of order"
    assert engine.stats.peak_kv_bytes <= layout.shape.nbytes(backend.config), "KV memory above the budget"
    return results
