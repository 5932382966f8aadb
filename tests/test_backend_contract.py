"""The Backend contract, one suite for every backend: what an engine may rely on.

Backends (``KINDS``): ``numpy``, the batch-invariant reference; ``numpy-blas``,
where only shapes, errors and closeness to numpy hold; ``numba``, the CUDA
kernels (here under the simulator: a smaller model, fewer examples, slots
only); ``tp``, tensor parallelism over a world of one MPI rank, in this process.

Bitwise, on every invariant backend:

- a lane's logits do not depend on the other lanes of its step;
- a prompt prefilled in chunks of any size gives the logits of the whole prompt at once;
- the logits of a prompt's last position equal feeding the prompt one token at a time;
- (paged KV) the same logits whatever the block size and wherever the blocks lie;
- ``move`` then a step equals the step where the request was.

On every backend: bad arguments raise ValueError naming the value and the limit.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_kernels import NO_CUDA, NumbaBackend, cuda_available
from numba_kernels.simulator import quick_switching
from reference import GPTConfig, KVShape, Lane, NumpyBackend, init_weights
from reference.backend import Backend

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_ctx=32)
N_SLOTS = 8  # full-context requests any KV memory here holds
BLOCK_SIZES = [1, 2, 3, 5, 8, 16]  # paged KV; CONFIG.n_ctx is Flover's slot


def tp_backend(config: GPTConfig, weights, kv: KVShape):
    from mpi4py import MPI

    from mpi_tp import launch

    return launch(config, weights, kv, comm=MPI.COMM_SELF)


@dataclass(frozen=True, slots=True)
class Kind:
    build: Callable[..., Backend]  # (config, weights, kv) -> a backend
    examples: int  # Hypothesis examples per property
    config: GPTConfig = CONFIG
    paged: bool = True  # reads KV through a block table of any block size
    longest: int = CONFIG.n_ctx  # the longest prompt most properties draw
    chunked: tuple[int, int] = (2, CONFIG.n_ctx)  # prompt lengths of the chunked-prefill property
    chunks: int | None = None  # the most chunks it cuts a prompt into
    lanes: int = 4  # the most lanes of a step


KINDS = {
    "numpy": Kind(NumpyBackend, examples=30),
    "numpy-blas": Kind(functools.partial(NumpyBackend, invariant=False), examples=10),
    "tp": Kind(tp_backend, examples=8),
    # A Python thread per GPU thread: one layer, short prompts; 9 rows send the whole prompt's GEMMs
    # to the tiled kernel and its chunks to GEMV, which must agree.
    "numba": Kind(NumbaBackend, examples=2, config=CONFIG.with_(n_layer=1), paged=False, longest=3, chunked=(9, 9),
                  chunks=2, lanes=2),  # fmt: skip
}
MARKS = {
    "numba": pytest.mark.skipif(not cuda_available(), reason=NO_CUDA),
    "tp": pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="no mpi4py"),
}


def kinds(*names: str) -> list:
    return [pytest.param(name, marks=MARKS.get(name, ()), id=name) for name in names]


INVARIANT = kinds("numpy", "numba", "tp")
EVERY = kinds("numpy", "numpy-blas", "numba", "tp")


@functools.cache
def weights_of(config: GPTConfig):
    return init_weights(config, seed=1, std=0.3)  # large enough that logits differ visibly between inputs


@pytest.fixture(scope="module")
def backend():
    """backend(kind, kv) -> that kind's backend over KV memory ``kv`` (default: slots), built once per module.

    Backends are reused across examples: every position a property reads it has written itself.
    """
    built = {}

    def get(kind: str, kv: KVShape | None = None):
        config = KINDS[kind].config
        kv = KVShape.slots(config, N_SLOTS) if kv is None else kv
        if (kind, kv) not in built:
            built[kind, kv] = KINDS[kind].build(config, weights_of(config), kv)
        return built[kind, kv]

    with quick_switching():  # the CUDA simulator's barriers
        yield get
    for b in built.values():
        if hasattr(b, "close"):
            b.close()


def run_property(kind: str, check: Callable) -> None:
    """``check(data)`` under Hypothesis, with this kind's number of examples."""
    settings(max_examples=KINDS[kind].examples, derandomize=kind in ("numba", "tp"))(given(data=st.data())(check))()


# ------------------------------------------------------------------ strategies


def drawn_backend(data, kind: str, backend) -> tuple[KVShape, Backend]:
    """This kind's backend over Flover's slots, or (if it reads block tables) blocks of a random size."""
    config = KINDS[kind].config
    kv = KVShape.slots(config, N_SLOTS)
    if KINDS[kind].paged and not data.draw(st.booleans(), label="slots"):
        size = data.draw(st.sampled_from(BLOCK_SIZES), label="block size")
        kv = KVShape(N_SLOTS * -(-config.n_ctx // size), size)
    return kv, backend(kind, kv)


def places(data, kv: KVShape, config: GPTConfig, count: int) -> list[np.ndarray]:
    """``count`` disjoint lists of blocks at random ids, each enough for a full context."""
    per = kv.blocks_per_slot(config)
    ids = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="placement")).permutation(kv.n_blocks)
    return [ids[i * per : (i + 1) * per] for i in range(count)]


def prompt(data, config: GPTConfig, least: int, most: int, label: str = "tokens") -> np.ndarray:
    token = st.integers(0, config.vocab_size - 1)
    return np.array(data.draw(st.lists(token, min_size=least, max_size=most), label=label), np.int64)


def chunks_of(data, tokens: np.ndarray, most: int | None) -> list[np.ndarray]:
    """``tokens`` cut at random places into 2 to ``most`` chunks (any number if None), unless it is 1 token."""
    if len(tokens) == 1:
        return [tokens]
    cuts = st.sets(st.integers(1, len(tokens) - 1), min_size=1, max_size=None if most is None else most - 1)
    return np.split(tokens, sorted(data.draw(cuts, label="cuts")))


def fed(backend, blocks: np.ndarray, pieces: list[np.ndarray]) -> np.ndarray:
    """Step a prompt into ``blocks`` piece by piece from position 0; -> logits after the last piece [V]."""
    start = 0
    for piece in pieces:
        out = backend.step([Lane.of(blocks, piece, start)])[0]
        start += len(piece)
    return out


# ------------------------------------------------------------------ bitwise properties


@pytest.mark.parametrize("kind", INVARIANT)
def test_lane_logits_do_not_depend_on_other_lanes(kind, backend):
    config, longest = KINDS[kind].config, KINDS[kind].longest

    def check(data):
        kv, b = drawn_backend(data, kind, backend)
        pasts, lanes = [], []
        for i, blocks in enumerate(places(data, kv, config, data.draw(st.integers(2, KINDS[kind].lanes), label="lanes"))):
            cached = prompt(data, config, i, longest - 1, "cached")  # lane i has >= i: lengths differ from the start
            if len(cached):
                pasts.append(Lane.of(blocks, cached, 0))
            lanes.append(Lane.of(blocks, prompt(data, config, 1, longest - len(cached), "new"), len(cached)))
        if pasts:
            b.step(pasts)
        together = b.step(lanes)  # [L, V]
        for i, lane in enumerate(lanes):  # alone, it rewrites its own K and V with the same values
            alone = b.step([lane])[0]
            assert np.array_equal(alone, together[i]), f"lane {i} of {len(lanes)} ({len(lane.tokens)} tokens "\
                f"from {lane.start}) changed beside the others"  # fmt: skip

    run_property(kind, check)


@pytest.mark.parametrize("kind", INVARIANT)
@pytest.mark.parametrize("cut", ["chunks", "one token at a time"])
def test_prompt_in_pieces_equals_whole_prompt(kind, cut, backend):
    """Chunked prefill of any chunk sizes, and feeding tokens one by one, give the whole prompt's last logits."""
    config, n_chunks = KINDS[kind].config, KINDS[kind].chunks
    least, most = KINDS[kind].chunked if cut == "chunks" else (2, KINDS[kind].longest)

    def check(data):
        kv, b = drawn_backend(data, kind, backend)
        whole_at, pieces_at = places(data, kv, config, 2)
        tokens = prompt(data, config, least, most)
        pieces = chunks_of(data, tokens, n_chunks) if cut == "chunks" else np.split(tokens, len(tokens))
        assert np.array_equal(fed(b, whole_at, [tokens]), fed(b, pieces_at, pieces)), f"pieces {list(map(len, pieces))}"

    run_property(kind, check)


@pytest.mark.parametrize("kind", kinds("numpy", "tp"))
def test_paged_logits_equal_whatever_block_size_and_place(kind, backend):
    """The same steps (chunks of several prompts side by side) in slots and in blocks of a random size."""
    config = KINDS[kind].config

    def check(data):
        size = data.draw(st.sampled_from(BLOCK_SIZES), label="block size")
        slots, paged = KVShape.slots(config, N_SLOTS), KVShape(N_SLOTS * -(-config.n_ctx // size), size)
        n = data.draw(st.integers(1, 4), label="prompts")
        prompts = [prompt(data, config, 1, config.n_ctx, f"prompt {i}") for i in range(n)]
        pieces = [chunks_of(data, p, None) for p in prompts]
        logits = []
        for kv in (slots, paged):
            where, b, out = places(data, kv, config, n), backend(kind, kv), []
            for j in range(max(map(len, pieces))):  # step j: chunk j of every prompt that has one
                live = [i for i in range(n) if j < len(pieces[i])]
                out.append(b.step([Lane.of(where[i], pieces[i][j], sum(map(len, pieces[i][:j]))) for i in live]))
            logits.append(out)
        for j, (a, b) in enumerate(zip(*logits, strict=True)):
            assert np.array_equal(a, b), f"step {j} differs between slots and blocks of {size}"

    run_property(kind, check)


@pytest.mark.parametrize("kind", INVARIANT)
def test_move_then_step_equals_step_in_place(kind, backend):
    config, longest = KINDS[kind].config, KINDS[kind].longest

    def check(data):
        kv, b = drawn_backend(data, kind, backend)
        n = data.draw(st.integers(1, 3), label="requests")
        where = places(data, kv, config, 2 * n)
        before, after = where[:n], where[n:]
        prompts = [prompt(data, config, 1, longest - 1, f"prompt {i}") for i in range(n)]
        b.step([Lane.of(blocks, p, 0) for blocks, p in zip(before, prompts, strict=True)])
        src, dst, lengths = [], [], []  # each block that holds a position, with the positions it holds
        for old, new, p in zip(before, after, prompts, strict=True):
            used = -(-len(p) // kv.block_size)
            src.extend(old[:used])
            dst.extend(new[:used])
            lengths.extend(min(kv.block_size, len(p) - j * kv.block_size) for j in range(used))
        b.move(np.array(src), np.array(dst), np.array(lengths))
        nxt = [prompt(data, config, 1, longest - len(p), f"next {i}") for i, p in enumerate(prompts)]
        moved = b.step([Lane.of(blocks, t, len(p)) for blocks, t, p in zip(after, nxt, prompts, strict=True)])
        stayed = b.step([Lane.of(blocks, t, len(p)) for blocks, t, p in zip(before, nxt, prompts, strict=True)])
        assert np.array_equal(moved, stayed), f"moved {len(src)} blocks of lengths {lengths}"

    run_property(kind, check)


# ------------------------------------------------------------------ every backend


@pytest.mark.parametrize("kind", kinds("numpy-blas", "numba", "tp"))
def test_logits_close_to_numpy(kind, backend):
    """Shapes, the teaching wrappers, and the numbers: TP over one rank runs numpy's kernels, so bitwise."""
    config = KINDS[kind].config
    b, ref = backend(kind), NumpyBackend(config, weights_of(config), N_SLOTS)
    assert isinstance(b, Backend) and b.n_slots == N_SLOTS and b.config == config
    tolerance = 0.0 if kind == "tp" else 1e-4
    calls = [
        lambda x: x.prefill(3, np.array([5, 17, 63, 0, 42])),  # [V]
        lambda x: x.step([Lane.of([1], [7, 9], 0), Lane.of([3], [11], 5), Lane.of([0], [2], 0)]),  # [3, V]
    ]
    for call in calls:
        got, want = call(b), call(ref)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    assert b.decode(np.zeros(0), np.zeros(0), np.zeros(0)).shape == (0, config.vocab_size)


def bad_steps(config: GPTConfig, kv: KVShape) -> list[tuple[list[Lane], str]]:
    """(lanes, the message they must raise) for KV memory of exactly 2 slots."""
    v, n_ctx = config.vocab_size, config.n_ctx
    return [
        ([Lane.of([0], [1, v], 0)], rf"token id {v} is outside the vocabulary 0\.\.{v - 1}"),
        ([Lane.of([0], [-1], 0)], rf"token id -1 is outside the vocabulary 0\.\.{v - 1}"),
        ([Lane.of([0], [1], n_ctx)], rf"positions {n_ctx}\.\.{n_ctx} must lie in 0\.\.{n_ctx - 1} \(n_ctx\)"),
        ([Lane.of([0], [1, 2, 3], n_ctx - 2)], rf"positions {n_ctx - 2}\.\.{n_ctx} must lie in 0\.\.{n_ctx - 1}"),
        ([Lane.of(np.zeros(0), [1], 0)], rf"lane 0: positions up to 0 need 1 blocks of {kv.block_size}, it has 0"),
        ([Lane.of([2], [1], 0)], r"block out of range 0\.\.1: \[2\]"),
        ([Lane.of([-1], [1], 0)], r"block out of range 0\.\.1: \[-1\]"),
        ([Lane.of([1], [1], 0), Lane.of([1], [2], 0)], r"lane 1: blocks \[1\] are used twice in one step"),
        ([Lane.of([0], np.zeros(0), 0)], r"needs at least 1 new token, got 0"),
        ([], r"a step needs at least 1 lane"),
    ]


def bad_moves(kv: KVShape) -> list[tuple[tuple[list[int], ...], str]]:
    """((src, dst, lengths), the message they must raise) for KV memory of exactly 2 blocks."""
    n = kv.block_size
    return [
        (([0], [0], [1]), r"move destinations \[0\] must be distinct holes, not sources \[0\]"),
        (([0], [2], [1]), r"destination block out of range 0\.\.1: \[2\]"),
        (([0, 1], [1], [1]), r"as many sources as destinations"),
        (([0], [1], [n + 1]), rf"move lengths must be one per pair in 0\.\.{n}, got \[{n + 1}\]"),
    ]


@pytest.mark.parametrize("kind", EVERY)
def test_bad_arguments_raise_value_error_naming_value_and_limit(kind, backend):
    config = KINDS[kind].config
    kv = KVShape.slots(config, 2)
    b = backend(kind, kv)
    for lanes, message in bad_steps(config, kv):
        with pytest.raises(ValueError, match=message):
            b.step(lanes)
    for args, message in bad_moves(kv):
        with pytest.raises(ValueError, match=message):
            b.move(*(np.array(a) for a in args))
    assert not getattr(b, "broken", False), "a bad argument reached the other ranks"
    assert b.step([Lane.of([1], [3], 0)]).shape == (1, config.vocab_size), "the backend still steps"


@pytest.mark.parametrize("kind", kinds("numpy", "tp"))
def test_paged_bad_arguments_name_the_block_size(kind, backend):
    config = KINDS[kind].config
    b = backend(kind, KVShape(4, 16))
    with pytest.raises(ValueError, match=r"lane 0: positions up to 16 need 2 blocks of 16, it has 1"):
        b.step([Lane.of([0], np.zeros(17), 0)])
    with pytest.raises(ValueError, match=r"lane 1: blocks \[2, 1\] are used twice"):
        b.step([Lane.of([0, 1], np.zeros(17), 0), Lane.of([2, 1], np.zeros(17), 0)])
    with pytest.raises(ValueError, match=r"lengths .* in 0\.\.16, got \[17\]"):
        b.move(np.array([0]), np.array([1]), np.array([17]))
    assert b.step([Lane.of([3, 2], np.zeros(20, np.int64), 0)]).shape == (1, config.vocab_size)
