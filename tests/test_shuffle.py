"""The memory shuffle plan: contiguous, fewest moves, no slot's data lost."""

from __future__ import annotations

import numpy as np
from hypothesis import given

from flover.engine.shuffle import choose_slot, has_hole, shuffle_plan, window
from flover.testing import slot_maps
from reference import GPTConfig, KVSlots


def fewest_moves(active: list[bool]) -> int:
    k = sum(active)
    return min(k - sum(active[s : s + k]) for s in range(len(active) - k + 1)) if k else 0


@given(slot_maps())
def test_plan_makes_window_contiguous_with_fewest_moves(active):
    plan = shuffle_plan(active)
    after = list(active)
    for src, dst in plan:
        assert after[src] and not after[dst], "moves go from an active slot into a hole"
        after[src], after[dst] = False, True
    first, last = window(after)
    assert sum(after) == sum(active) and not has_hole(after) and last - first == sum(active)
    assert len(plan) == fewest_moves(active)


@given(slot_maps())
def test_plan_loses_no_slot_data(active):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=4, vocab_size=8, n_ctx=3)
    cache = KVSlots(config, len(active))
    rng = np.random.default_rng(0)
    cache.k[:] = rng.standard_normal(cache.k.shape)
    cache.v[:] = rng.standard_normal(cache.v.shape)
    before = {s: (cache.k[:, s].copy(), cache.v[:, s].copy()) for s, a in enumerate(active) if a}
    plan = shuffle_plan(active)
    cache.move(np.array([s for s, _ in plan]), np.array([d for _, d in plan]))
    where = {s: s for s in before}
    for src, dst in plan:
        where[src] = dst
    for s, (k, v) in before.items():
        assert np.array_equal(cache.k[:, where[s]], k) and np.array_equal(cache.v[:, where[s]], v)


@given(slot_maps())
def test_newcomer_slot_keeps_a_dense_window_dense(active):
    if all(active):
        return
    shuffled = list(active)
    for src, dst in shuffle_plan(active):
        shuffled[src], shuffled[dst] = False, True
    slot = choose_slot(shuffled)
    assert not shuffled[slot]
    shuffled[slot] = True
    assert not has_hole(shuffled)
