"""The model-free backend: deterministic streams under every schedule; every request served once, in full."""

from __future__ import annotations

import pytest

from flover.engine import Request
from flover.runner import PolicyConfig
from flover.sim.backend import ModelFreeBackend, stream
from flover.sim.device import load_device
from flover.sim.run import Plan, simulate
from flover.sim.shapes import ModelShape
from flover.trace import poisson_trace
from reference import GPTConfig, Lane, SamplingParams
from tests.conftest import assert_first_free

SHAPE = ModelShape("small", GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_ctx=96))
PLAN = Plan(load_device("a100-80gb"), SHAPE)

POLICIES = [
    PolicyConfig("fused", slots=4),
    PolicyConfig("fused", slots=4, shuffle=False),
    PolicyConfig("fused", slots=4, prefill="chunked", chunk_tokens=7),
    PolicyConfig("fused", kv="paged", block_size=4, kv_memory_gib=12 * 4 * 2 * 2 * 64 * 4 / 2**30),  # 12 blocks: preempts
    PolicyConfig("serial"),
    PolicyConfig("dynamic", max_batch=3, queue_delay_s=0.01),
    PolicyConfig("instances", instances=3),
]


def workload() -> list[Request]:
    """Arrivals close enough that holes open, slots move and the paged pool runs out; some requests sampled."""
    trace = poisson_trace(300.0, 14, (3, 12), (4, 30), seed=5, vocab_size=97)
    return [r if i % 3 else Request(r.id, r.arrival_s, r.prompt_ids, r.max_new_tokens,
                                    SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=i))
            for i, r in enumerate(trace)]  # fmt: skip


@pytest.mark.parametrize("pc", POLICIES, ids=lambda pc: pc.label)
def test_every_request_once_with_its_own_stream_under_every_policy(pc):
    requests = workload()
    run = simulate(PLAN, pc, requests)
    assert sorted(r.id for r in run.results) == sorted(r.id for r in requests)
    for result in run.results:
        request = next(r for r in requests if r.id == result.id)
        assert result.tokens == stream(request.prompt_ids, request.max_new_tokens, 97), pc.label
    if pc.policy == "instances":
        assert_first_free(run.results)
        assert {r.instance for r in run.results} == {0, 1, 2} and any(r.admitted_s > r.arrival_s for r in run.results)
    if pc.label.startswith("fused (slots 4)"):
        assert run.stats.moves > 0, "the workload must make the shuffle move slots"
    if pc.kv == "paged":
        assert run.stats.preemptions > 0, "the workload must make the pool preempt and recompute"
    if not pc.shuffle:
        assert run.metrics["idle_rows"] > 0, "the workload must leave holes to compute"


def test_a_stop_id_ends_the_stream_where_it_comes_up():
    prompt = (1, 2, 3)
    tokens = stream(prompt, 20, 97)
    stop = next(t for t in tokens[3:] if t not in tokens[:3])
    request = Request("r", 0.0, prompt, 20, stop_ids=(stop,))
    (result,) = simulate(PLAN, PolicyConfig("fused"), [request]).results
    assert result.tokens == tokens[: tokens.index(stop) + 1] and result.finish_reason == "stop"


def test_streams_depend_on_the_prompt_and_nothing_else():
    backend = ModelFreeBackend(SHAPE.config, 3)
    a = backend.step([Lane.of([0], [5, 6, 7], 0), Lane.of([2], [5, 6, 8], 0)]).argmax(axis=1)
    b = backend.step([Lane.of([1], [5, 6, 7], 0)]).argmax(axis=1)
    assert a[0] == b[0] == stream([5, 6, 7], 1, 97)[0]  # the same prompt in another slot, beside another lane
    assert a[1] == stream([5, 6, 8], 1, 97)[0]
    assert backend.prefix.nbytes == 3 * 96 * 8  # one hash a position: no weights, no K or V


def test_the_backend_checks_lanes_like_a_backend_with_the_math():
    backend = ModelFreeBackend(SHAPE.config, 2)
    with pytest.raises(ValueError, match="vocabulary"):
        backend.step([Lane.of([0], [97], 0)])
    with pytest.raises(ValueError, match="n_ctx"):
        backend.step([Lane.of([0], [1], 96)])
