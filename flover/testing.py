"""Hypothesis strategies for traces, slot maps and policies, and the serial ground truth.

Import them to test your own scheduler the way flover tests its own::

    from hypothesis import given
    from flover.testing import traces, serial_outputs

    @given(traces(vocab_size=97, n_ctx=64))
    def test_my_scheduler(trace):
        assert my_scheduler(trace) == serial_outputs(make_backend, trace)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypothesis import strategies as st

from flover.request import Request
from reference import SamplingParams, generate
from reference.backend import Backend


@st.composite
def requests(draw, id: int | str, vocab_size: int, n_ctx: int, max_arrival: float = 20.0,
             max_new_tokens: int = 12, sampled: bool = True) -> Request:  # fmt: skip
    """One request that fits the model: a prompt, an output length, greedy or seeded sampling, stops."""
    prompt_len = draw(st.integers(1, max(1, min(16, n_ctx - 2))))
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
    return Request(id, arrival, tuple(draw(st.lists(token, min_size=prompt_len, max_size=prompt_len))), new,
                   sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, stops)  # fmt: skip


@st.composite
def traces(draw, vocab_size: int, n_ctx: int, min_requests: int = 1, max_requests: int = 8,
           max_arrival: float = 20.0, max_new_tokens: int = 12, sampled: bool = True) -> list[Request]:  # fmt: skip
    """A list of requests with distinct ids and arrival times in virtual-clock steps."""
    n = draw(st.integers(min_requests, max_requests))
    return [draw(requests(i, vocab_size, n_ctx, max_arrival, max_new_tokens, sampled)) for i in range(n)]


def slot_maps(max_slots: int = 24) -> st.SearchStrategy[list[bool]]:
    """Which slots of a KV cache are active."""
    return st.lists(st.booleans(), min_size=1, max_size=max_slots)


def serial_outputs(make_backend: Callable[[int], Backend], trace: Sequence[Request]) -> dict:
    """The ground truth: each request decoded alone by ``reference.generate``; id -> tokens."""
    backend = make_backend(1)
    return {r.id: list(generate(backend, r.prompt_ids, r.max_new_tokens, r.sampling, r.stop_ids)) for r in trace}
