"""The engine's parts one at a time: what a layout computes and moves, paging and preemption,
chunked prefill's budget, a user's own scheduler, and instances as processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from flover.backends import BackendFactory
from flover.clock import VirtualClock, WallClock
from flover.engine import Engine, FusedScheduler, PagedLayout, Request, Scheduler, SerialScheduler, SlotLayout
from flover.runner import PolicyConfig, run_policy
from flover.testing import check_scheduler, serial_outputs, traces
from reference import NumpyBackend, init_weights
from tests.conftest import SMALL, assert_first_free


class RecordingBackend(NumpyBackend):
    """A NumpyBackend that remembers the lanes of every step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = []

    def step(self, lanes):
        self.steps.append([(lane.blocks.tolist(), lane.tokens.tolist(), lane.start) for lane in lanes])
        return super().step(lanes)


@pytest.fixture(scope="module")
def make_backend(small_model):
    config, weights = small_model
    return lambda kv: NumpyBackend(config, weights, kv)


def burst(*lengths: tuple[int, int]) -> list[Request]:
    """Requests arriving together with (prompt length, new tokens) each."""
    return [Request(i, 0.0, tuple(range(1, p + 1)), n) for i, (p, n) in enumerate(lengths)]


def test_a_hole_without_the_shuffle_recomputes_the_departed_lane_at_its_last_length(small_model):
    backend = RecordingBackend(*small_model, 3)
    engine = Engine(backend, FusedScheduler(), SlotLayout(SMALL, 3, shuffle=False), VirtualClock())
    engine.run(burst((4, 6), (5, 2), (3, 6)))  # request 1, in slot 1, leaves after 2 tokens
    ghost = ([1], 5)  # slot 1, its last position: prompt 5 + 1 fed token - 1
    later = [step for step in backend.steps if any((b, s) == ghost for b, _, s in step)][1:]  # [0]: its own decode
    assert later, "the hole is computed"
    assert all(len(step) == 3 for step in later), "beside the two live requests, as one contiguous window"
    assert [s.idle_rows for s in engine.stats.steps if s.idle_rows] == [1] * len(later)
    assert engine.stats.moves == 0


def test_the_shuffle_fills_the_hole_instead(small_model):
    backend = RecordingBackend(*small_model, 3)
    engine = Engine(backend, FusedScheduler(), SlotLayout(SMALL, 3, shuffle=True), VirtualClock())
    engine.run(burst((4, 6), (5, 2), (3, 6)))
    assert engine.stats.moves == 1 and sum(s.idle_rows for s in engine.stats.steps) == 0
    assert all(len(step) <= 3 for step in backend.steps)


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_request_that_ends_in_its_prefill_leaves_no_hole_uncomputed_or_unfilled(small_model, shuffle):
    """Request 1 ends with its prefill's one token while request 2, prefilled after it, sits above its slot:
    the fused decode step that follows sees a window of slots 0-2 with a hole at 1."""
    backend = RecordingBackend(*small_model, 3)
    engine = Engine(backend, FusedScheduler(), SlotLayout(SMALL, 3, shuffle=shuffle), VirtualClock())
    done = engine.run(burst((4, 5), (5, 1), (3, 5)))
    assert sorted(len(r.tokens) for r in done) == [1, 5, 5]
    decodes = [sorted(b[0] for b, tokens, _ in step) for step in backend.steps if len(step) > 1 or len(step[0][1]) == 1]
    if shuffle:  # moved down before the decode step: every window is slots 0..k-1, no idle row
        assert engine.stats.moves == 1 and all(slots == list(range(len(slots))) for slots in decodes)
        assert sum(s.idle_rows for s in engine.stats.steps) == 0
    else:  # the hole is computed as request 1's last lane until the window shrinks
        assert engine.stats.moves == 0 and decodes[0] == [0, 1, 2]
        assert engine.stats.steps[3].idle_rows == 1


def test_paged_memory_is_returned_and_a_tight_pool_preempts_without_losing_anyone(make_backend):
    trace = burst((6, 10), (6, 10), (6, 10))
    layout = PagedLayout(SMALL, n_blocks=5, block_size=4)  # each request needs 4 blocks at its longest
    results = check_scheduler(FusedScheduler(), lambda: layout, make_backend, trace)
    assert sum(r.preempted for r in results) > 0, "three requests of 4 blocks cannot share 5"
    assert layout.held_bytes() == 0 and sorted(layout.free) == list(range(5)), "every block returned"


def test_paged_admission_stops_when_the_pool_cannot_hold_the_prompt_plus_one_block(make_backend):
    layout = PagedLayout(SMALL, n_blocks=4, block_size=4)
    engine = Engine(make_backend(layout.shape), FusedScheduler(), layout, VirtualClock())
    engine.run(burst((8, 1), (4, 1)))  # 2 + 1 blocks, then 1 + 1 of the 1 left: the second waits
    first, second = engine.stats.steps[0], engine.stats.steps[1]
    assert (first.batch, first.rows) == (1, 8) and second.rows == 4 and second.start_s >= first.end_s


def test_a_request_larger_than_the_pool_is_refused_by_name(make_backend):
    layout = PagedLayout(SMALL, n_blocks=3, block_size=4)
    engine = Engine(make_backend(layout.shape), FusedScheduler(), layout, VirtualClock())
    with pytest.raises(ValueError, match=r"request 0 needs 4 blocks of 4 positions .* pool's 3; raise --kv-memory"):
        engine.run(burst((8, 8)))


@settings(max_examples=25)
@given(trace=traces(SMALL.vocab_size, SMALL.n_ctx, max_requests=6, max_arrival=3))
def test_chunked_steps_hold_at_most_the_budget_with_decodes_first(small_model, trace):
    backend = RecordingBackend(*small_model, 4)
    engine = Engine(backend, FusedScheduler("chunked", chunk_tokens=5), SlotLayout(SMALL, 4), VirtualClock())
    engine.run(trace)
    for step in backend.steps:
        sizes = [len(tokens) for _, tokens, _ in step]
        assert sum(sizes) <= max(5, sizes.count(1)), f"step of {sizes} tokens over the budget of 5"
        first_chunk = next((i for i, n in enumerate(sizes) if n > 1), len(sizes))
        assert all(n == 1 for n in sizes[:first_chunk]), "decodes first"


class ShortestPromptFirst(FusedScheduler):
    """Admission in another order than arrival: the shortest waiting prompt first."""

    def admit(self, waiting, running, memory, now):
        return super().admit(sorted(waiting, key=lambda s: len(s.ids)), running, memory, now)


@settings(max_examples=20)
@given(trace=traces(SMALL.vocab_size, SMALL.n_ctx, max_requests=6, max_arrival=2))
def test_a_scheduler_may_admit_out_of_arrival_order(make_backend, trace):
    check_scheduler(ShortestPromptFirst(), lambda: SlotLayout(SMALL, 2), make_backend, trace)


class OnePrefillPerIteration(Scheduler):
    """The example of ``flover.engine.scheduler``'s docstring."""

    name = "one-prefill"

    def admit(self, waiting, running, memory, now):
        if waiting and memory.can_admit(waiting[0]):
            memory.admit(waiting[0])
            return [waiting[0]]
        return []

    def steps(self, running):
        for state in [s for s in running if s.uncached > 1]:
            yield [(state, state.uncached)]
        yield [(s, 1) for s in running if s.uncached == 1]


@settings(max_examples=25)
@given(trace=traces(SMALL.vocab_size, SMALL.n_ctx, max_requests=6))
def test_a_user_scheduler_is_checked_by_flover_testing(make_backend, trace):
    check_scheduler(OnePrefillPerIteration(), lambda: SlotLayout(SMALL, 3), make_backend, trace)


class ForgetsTheLastRequest(FusedScheduler):
    """Broken on purpose: never admits request 3."""

    def admit(self, waiting, running, memory, now):
        return super().admit([s for s in waiting if s.request.id != 3][:1], running, memory, now)


def test_a_scheduler_that_never_admits_someone_is_an_error_not_a_silent_loss(make_backend):
    with pytest.raises(RuntimeError, match="request 3 waits, nothing runs"):
        check_scheduler(ForgetsTheLastRequest(), lambda: SlotLayout(SMALL, 2), make_backend,
                        burst((2, 2), (2, 2), (2, 2), (2, 2)))  # fmt: skip


def test_serial_scheduler_runs_one_request_at_a_time(small_model):
    backend = RecordingBackend(*small_model, 2)
    Engine(backend, SerialScheduler(), SlotLayout(SMALL, 2), VirtualClock()).run(burst((3, 4), (2, 4)))
    assert all(len(step) == 1 for step in backend.steps)


def test_instances_are_processes_with_their_own_model_and_return_serial_tokens(small_model, make_backend):
    trace = [Request(i, 0.0, tuple(range(1, 4 + i)), 6) for i in range(6)]  # a burst: both instances get work
    factory = BackendFactory("numpy", *small_model)
    run = run_policy(PolicyConfig("instances", instances=2), factory, trace, clock=WallClock())
    assert {r.id: r.tokens for r in run.results} == serial_outputs(make_backend, trace)
    assert {r.instance for r in run.results} == {0, 1}, "the router used both instances"
    assert run.metrics["decode_steps"] > 0
    assert_first_free(run.results, slack_s=0.5)


def test_the_first_instance_free_takes_the_next_waiting_request():
    """A long request holds instance 0; the short ones behind it all go to instance 1 as it frees, in turn."""
    config = SMALL.with_(n_ctx=1024)  # a long request: about 100 times the three short ones, on a busy machine too
    trace = [Request(0, 0.0, (1, 2, 3), config.n_ctx - 3)] + [Request(i, 0.0, (1, 2, 3), 2) for i in range(1, 4)]
    run = run_policy(PolicyConfig("instances", instances=2), BackendFactory("numpy", config, init_weights(config, 1)),
                     trace, clock=WallClock())  # fmt: skip
    by_id = {r.id: r for r in run.results}
    assert [by_id[i].instance for i in range(4)] == [0, 1, 1, 1]
    assert by_id[1].finish_s <= by_id[2].admitted_s and by_id[2].finish_s <= by_id[3].admitted_s


def test_a_memory_check_names_the_figures_the_limit_and_the_flag():
    from flover.budget import check_memory

    with pytest.raises(ValueError, match=r"needs 1\.0 GiB .* more than the 0\.5 GiB .*lower --slots or --kv-memory"):
        check_memory(SMALL, kv_bytes=2**30, available=2**29)
    with pytest.raises(ValueError, match="lower --instances"):
        check_memory(SMALL, kv_bytes=0, instances=1000, instance_kv_bytes=2**20, available=2**29)


def test_kv_budget_sizes_both_layouts():
    slot = 2 * SMALL.n_layer * SMALL.n_embd * 4 * SMALL.n_ctx  # bytes of one full-context slot
    gib = 10 * slot / 2**30
    assert PolicyConfig("fused", kv_memory_gib=gib).layout(SMALL).shape.n_blocks == 10
    paged = PolicyConfig("fused", kv="paged", block_size=16, kv_memory_gib=gib).layout(SMALL).shape
    assert paged.n_blocks == 10 * SMALL.n_ctx // 16 and paged.nbytes(SMALL) == 10 * slot
    with pytest.raises(ValueError, match="holds no slot"):
        PolicyConfig("fused", kv_memory_gib=slot / 2 / 2**30).layout(SMALL)


def test_step_records_count_prefill_decode_and_idle_rows(make_backend):
    run = run_policy(PolicyConfig("fused", slots=2), make_backend, burst((3, 3), (4, 3)), clock=VirtualClock())
    steps = run.stats.steps
    assert sum(s.prefill_rows for s in steps) == 7 and sum(s.rows for s in steps) == 7 + 2 * 2
    assert run.metrics["mean_batch"] == 2.0 and run.metrics["kv_peak_bytes"] <= run.metrics["kv_budget_bytes"]


def test_a_live_engine_serves_requests_submitted_while_it_runs_and_drops_the_cancelled(small_model, make_backend):
    import threading

    from flover.engine import LiveEngine, QueueFull

    finished, first_tokens = [], threading.Event()
    engine = Engine(NumpyBackend(*small_model, 2), FusedScheduler(), SlotLayout(SMALL, 2), WallClock(),
                    on_finish=finished.append, on_token=lambda state: first_tokens.set())  # fmt: skip
    live = LiveEngine(engine, max_waiting=10).start()
    trace = burst((3, 5), (4, 5), (2, 5))
    for r in trace:
        live.submit(r)
    first_tokens.wait(5)
    long = live.submit(Request("long", 0.0, (1, 2), 60))
    live.cancel("long")
    live.stop(timeout=30)
    by_id = {r.id: r for r in finished}
    assert sorted(map(str, by_id)) == ["0", "1", "2", "long"], "each accepted request handed back once"
    truth = serial_outputs(make_backend, trace)
    assert all(by_id[r.id].tokens == truth[r.id] for r in trace)
    assert by_id["long"].finish_reason == "cancelled" and len(by_id["long"].tokens) < 60
    assert long.arrival_s > 0 and live.running == live.waiting == 0 and engine.memory.held_bytes() == 0
    with pytest.raises(RuntimeError, match="shutting down"):
        live.submit(Request("late", 0.0, (1,), 1))
    full = LiveEngine(Engine(NumpyBackend(*small_model, 1), FusedScheduler(), SlotLayout(SMALL, 1)), max_waiting=0)
    with pytest.raises(QueueFull, match="the bound --max-waiting is 0"):
        full.submit(Request("x", 0.0, (1,), 1))


def test_an_instance_that_fails_is_reported_not_waited_for(small_model):
    factory = BackendFactory("no-such-backend", *small_model)
    with pytest.raises(RuntimeError, match=r"model instance \d failed:(.|\n)*unknown backend 'no-such-backend'"):
        run_policy(PolicyConfig("instances", instances=2), factory, burst((2, 2)), clock=WallClock())


def test_warm_up_works_on_a_pool_smaller_than_one_slot(small_model):
    from flover.runner import warm_up
    from reference import KVShape

    warm_up(NumpyBackend(*small_model, KVShape(n_blocks=2, block_size=4)))  # 8 positions; a slot is 64
    warm_up(NumpyBackend(*small_model, 1))
