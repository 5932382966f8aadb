# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 5: the memory shuffle
#
# In lesson 4 the fused engine kept every request of its running batch in
# a KV slot and ran one decode step over all of them. This lesson looks at
# those slots: how **holes** appear when requests leave, why a hole costs as
# much as a request, and Flover's **memory shuffle**, which moves the fewest
# slots needed to close the holes. We check that the shuffle's plan is
# minimal by brute force, that moving a slot changes no logit, and how many
# rows it saves on a trace; then the other answer, paged KV blocks, where
# nothing moves.

# %% [markdown]
# The helpers of lesson 2: `OUT`, `show(fig, name)` and `show_file(path)`
# for pictures, and one thread per process for steady timings.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# One thread per process, set before NumPy and Numba load: on a small model and a
# busy machine, parallel kernels spend more time waiting for each other than
# computing, and timings jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## Slot maps, the window and holes
#
# Describe the slots by a **slot map**: a list of booleans, True where a slot
# holds a request in flight (an *active* slot). A fused decode step has to
# address every active slot. A kernel that runs over a **window**, one
# contiguous range of slots, is the simple and fast way to do it on a GPU: a
# base pointer and a count. `flover.engine.shuffle.window(active)` is that
# range, `(first, last + 1)` of the active slots. A free slot inside the
# window is a **hole**: it is computed like a request, for nothing.
# `flover.engine.shuffle.has_hole(active)` tells whether there is one.
# %%
from flover.engine.shuffle import best_window, choose_slot, has_hole, shuffle_plan, window

active = [True, False, False, True, True, False, True, True, False, False, True, False]
first, last = window(active)
print(f"window {first}..{last - 1}: {last - first} slots computed for {sum(active)} requests")
assert (first, last) == (0, 11) and has_hole(active)
assert not has_hole([False, True, True, True, False])

# %% [markdown]
# Holes appear when a request in the middle of the window finishes before its
# neighbours; requests finish whenever their output is done, so with varied
# output lengths that happens all the time. The engine fills holes when it
# can: `flover.engine.shuffle.choose_slot(active)` gives a newcomer the first
# hole inside the window, else the slot just after the window, else the one
# just before it. But when no one arrives, holes stay.

# %%
assert choose_slot(active) == 1, "a newcomer fills the first hole"
assert choose_slot([False, True, True, False]) == 3, "no hole: the slot just after the window"
assert choose_slot([False, True, True]) == 0, "the window reaches the end: the slot just before it"

# %% [markdown]
# ## The shuffle plan
#
# Flover's algorithm, with k active slots:
#
# 1. slide a window of length k over the slots and pick the position where it
#    holds the most active slots (the leftmost on ties):
#    `flover.engine.shuffle.best_window(active)` returns its start;
# 2. move every active slot outside that window into a hole inside it, holes
#    filled left to right: `flover.engine.shuffle.shuffle_plan(active)`
#    returns those moves as (source, destination) pairs.
#
# After the moves the active slots are exactly the chosen window: contiguous.
# In our map the best window is slots 2..7, which already holds 4 of the 6
# requests, so 2 moves suffice where packing everything to the left would
# take 3.


# %%
def apply(active: list[bool], plan: list[tuple[int, int]]) -> list[bool]:
    """The slot map after the moves; every destination must be a hole and no slot a source twice."""
    sources, destinations = [s for s, _ in plan], [d for _, d in plan]
    assert all(active[s] for s in sources) and not any(active[d] for d in destinations)
    assert len(set(sources)) == len(sources) and len(set(destinations)) == len(destinations)
    after = list(active)
    for s, d in plan:
        after[s], after[d] = False, True
    return after


def contiguous(active: list[bool]) -> bool:
    first, last = window(active)
    return sum(active) == last - first


plan = shuffle_plan(active)
after = apply(active, plan)
print(f"k = {sum(active)}, best window starts at {best_window(active)}; moves: {plan}")
assert contiguous(after) and sum(after) == sum(active)
assert best_window(active) == 2 and plan == [(0, 2), (10, 5)]
assert sum(active[6:]) == 3, "packing to the left (slots 0..5) would have taken 3 moves"

# %% [markdown]
# The picture: the slot map before (top) and after (bottom), the chosen
# window outlined, an arrow per move.

# %%
from matplotlib.patches import Rectangle


def draw_shuffle(active: list[bool], plan: list[tuple[int, int]], name: str) -> None:
    after = apply(active, plan)
    start, k = best_window(active), sum(active)
    fig, ax = plt.subplots(figsize=(0.6 * len(active) + 1, 2.6))
    for row, (label, slots) in enumerate((("before", active), ("after", after))):
        y = 1.6 * (1 - row)
        for i, a in enumerate(slots):
            ax.add_patch(Rectangle((i, y), 0.9, 0.9, color="#4e79a7" if a else "#e8e8e8"))
        ax.text(-0.3, y + 0.45, label, ha="right", va="center")
    ax.add_patch(Rectangle((start - 0.05, 1.55), k, 1.0, fill=False, edgecolor="#e15759", linewidth=2))
    for s, d in plan:
        ax.annotate("", xy=(d + 0.45, 0.95), xytext=(s + 0.45, 1.55),
                    arrowprops=dict(arrowstyle="->", color="#f28e2b", linewidth=2))  # fmt: skip
    ax.set_xlim(-2, len(active) + 0.2)
    ax.set_ylim(-0.1, 2.6)
    ax.set_xticks([i + 0.45 for i in range(len(active))], range(len(active)))
    ax.set_yticks([])
    ax.set_frame_on(False)
    ax.set_title(f"{len(plan)} moves into the best window (red) of {k} slots")
    show(fig, name)


draw_shuffle(active, plan, "04_shuffle_plan.png")

# %% [markdown]
# ## Is it the fewest moves? Ask a brute force
#
# Why it is minimal: whatever the final window W, every active slot outside W
# must move at least once, and one move each suffices (there are exactly as
# many holes in W as active slots outside it). So the fewest moves is the
# smallest number of active slots outside any length-k window, and
# `best_window` picks the window that leaves the fewest outside.
#
# An argument is good; a check is better. `fewest_moves` searches
# breadth-first over every sequence of single moves (any active slot to any
# free slot) for the shortest one that ends contiguous. It knows nothing
# about windows. We compare it with `shuffle_plan` on every slot map of up to
# 8 slots.

# %%
from collections import deque
from itertools import product


def fewest_moves(active: tuple[bool, ...]) -> int:
    seen, queue = {active: 0}, deque([active])
    while queue:
        state = queue.popleft()
        if contiguous(list(state)):
            return seen[state]
        for s, d in product(range(len(state)), repeat=2):
            if state[s] and not state[d]:
                moved = list(state)
                moved[s], moved[d] = False, True
                if tuple(moved) not in seen:
                    seen[tuple(moved)] = seen[state] + 1
                    queue.append(tuple(moved))
    raise AssertionError("unreachable: a contiguous map always exists")


checked = 0
for n in range(1, 9):
    for bits in product([False, True], repeat=n):
        plan_n = shuffle_plan(list(bits))
        assert contiguous(apply(list(bits), plan_n)), bits
        assert len(plan_n) == fewest_moves(bits), bits
        checked += 1
print(f"shuffle_plan uses the fewest moves on all {checked} slot maps of 1 to 8 slots")

# %% [markdown]
# ## Moving a slot moves a request
#
# A move must carry everything that belongs to the request: the K and V of
# every layer (and its position and its sampler, which the engine keeps in
# the request's own record, a `RequestState`, so only the layout's note of
# where the request lives changes). `backend.move(src, dst, lengths)`, the
# second method of lesson 2's `Backend` protocol, copies the first
# `lengths[i]` positions of block `src[i]` into block `dst[i]`, in every
# layer; here a block is a slot (`backend.move_slots` says the same for the
# slot layout). It costs `2 * n_layer * n_head * head_dim * 4` bytes per
# position.
#
# The test of a correct move: decode the requests before and after the
# shuffle and compare. Fill the active slots of our map with prompts of
# different lengths, run one decode step over the requests of the window,
# shuffle, and run the same step over the new, shorter window. Every
# request's logits are the same bit for bit (lesson 8 explains why a
# request's logits do not depend on which rows share its step).

# %%
from flover.loading import resolve
from reference import NumpyBackend

config, weights, tokenizer = resolve(None)
backend = NumpyBackend(config, weights, n_slots=len(active))
rng = np.random.default_rng(0)
length = {slot: int(rng.integers(3, 40)) for slot, a in enumerate(active) if a}  # prompt length per active slot
for slot, n in length.items():
    backend.prefill(slot, rng.integers(0, config.vocab_size, size=n))
token = {slot: int(rng.integers(0, config.vocab_size)) for slot in length}


def step(slots: list[int], owner: dict[int, int]) -> dict[int, np.ndarray]:
    """One decode step over ``slots``; owner maps a slot to the original slot of its request."""
    logits = backend.decode(np.array(slots), np.array([token[owner[s]] for s in slots]),
                            np.array([length[owner[s]] for s in slots]))  # fmt: skip
    return {owner[s]: logits[row] for row, s in enumerate(slots)}


first, last = window(active)
before = step([s for s in range(first, last) if active[s]], {s: s for s in length})
src, dst = np.array([s for s, _ in plan]), np.array([d for _, d in plan])
backend.move(src, dst, np.array([length[s] for s in src]))
owner = {s: s for s in length if s not in src} | {int(d): int(s) for s, d in plan}
first, last = window(after)
after_logits = step(list(range(first, last)), owner)
for request in length:
    assert np.array_equal(before[request], after_logits[request]), f"request of slot {request} changed"
per_position = 2 * config.n_layer * config.n_head * config.head_dim * 4
moved = sum(length[s] for s in src)
print(f"{len(plan)} moves copied {moved} positions, {moved * per_position / 1e3:.1f} kB; every logit unchanged")

# %% [markdown]
# ## What the shuffle saves on a trace
#
# The fused policy of lesson 4 is the engine loop, `flover.engine.Engine`,
# run with three parts: a scheduler (`FusedScheduler()`: each newcomer's
# prompt alone, then one fused step for everyone), a clock, and a **KV
# layout**, which decides where each request lives and what moves.
# `SlotLayout(config, n_slots, shuffle)` is Flover's. With `shuffle=True`
# it gives each newcomer `choose_slot`'s slot and, after every step that
# leaves a hole, returns `shuffle_plan`'s moves, which the engine hands to
# `backend.move`. With `shuffle=False` it keeps its holes, and a hole is
# still computed, as a fused kernel over the contiguous window computes it:
# the layout adds to every decode step, for each hole, the departed
# request's last lane again (its last token, attending over its last
# length). So a hole costs exactly what it cost that request to be in the
# batch. `engine.run(requests)` serves a trace, and `engine.stats` records
# every step (`batch`: requests served, `rows`: rows computed, of which
# `idle_rows` for no one, and `prefill_rows` for prompts) and the number of
# slot `moves`.
#
# Serve one Poisson trace with widely varying output lengths both ways,
# under the virtual clock of lesson 4 so the two runs make the same
# decisions at the same times.

# %%
from flover.clock import VirtualClock
from flover.engine import Engine, FusedScheduler, SlotLayout
from flover.trace import poisson_trace

trace = poisson_trace(150.0, 48, prompt_len=(4, 16), output_len=(1, 96), seed=1, vocab_size=config.vocab_size)
engines, tokens = {}, {}
for shuffle in (False, True):
    engines[shuffle] = Engine(NumpyBackend(config, weights, 16), FusedScheduler(), SlotLayout(config, 16, shuffle),
                              VirtualClock(0.001, 0.002))  # fmt: skip
    tokens[shuffle] = {r.id: r.tokens for r in engines[shuffle].run(trace)}
assert tokens[True] == tokens[False], "the shuffle changes no token"

decode_steps = {s: [step for step in e.stats.steps if step.prefill_rows == 0] for s, e in engines.items()}
computed = {s: sum(step.rows for step in steps) for s, steps in decode_steps.items()}
served = {s: sum(step.batch for step in steps) for s, steps in decode_steps.items()}
for s, e in engines.items():
    print(f"shuffle={s!s:5}: {len(decode_steps[s])} decode steps, {served[s]} tokens decoded, {computed[s]} rows "
          f"computed, {e.stats.moves} moves")  # fmt: skip
assert served[True] == served[False]
assert all(step.idle_rows == 0 for step in engines[True].stats.steps), "with the shuffle there is never a hole"
assert computed[True] == served[True] < computed[False]
assert computed[False] - served[False] == sum(step.idle_rows for step in decode_steps[False])
print(f"without the shuffle {1 - served[False] / computed[False]:.0%} of the rows computed were holes")

# %%
fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
for ax, shuffle in zip(axes, (False, True)):
    steps = decode_steps[shuffle]
    ax.step(range(len(steps)), [s.rows for s in steps], where="post", color="#e15759", label="rows computed")
    ax.step(range(len(steps)), [s.batch for s in steps], where="post", color="#4e79a7", label="requests served (batch)")
    ax.set_title(f"shuffle={shuffle}: {computed[shuffle]} rows computed, {engines[shuffle].stats.moves} moves")
    ax.set_ylabel("per decode step")
axes[0].legend(fontsize=8)
axes[1].set_xlabel("decode step")
show(fig, "04_rows_vs_batch.png")

# %% [markdown]
# ## What a hole costs in time
#
# A computed hole costs what one more request in the step costs. Measure the
# time of a decode step against its width, the slots it computes (fastest of
# a few tries, as in lesson 4), and fit a straight line, a + b * width: b is
# the price of one slot, and the idle rows above cost about b times their
# number. On a GPU, where Flover ran, the gap is larger (it measured 1.29x
# to 1.93x from shuffling on variable-length workloads); on this small CPU
# model the fixed cost a of a step dominates. A shuffle is paid in copies:
# each of its `moves` copies a request's cached positions, at the bytes per
# position computed above.

# %%
import time


def step_ms(backend, width: int, position: int = 40, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        backend.decode(np.arange(width), np.zeros(width, np.int64), np.full(width, position))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


probe = NumpyBackend(config, weights, 16)
widths = np.arange(1, 17)
cost = np.array([step_ms(probe, int(w)) for w in widths])
b, a = np.polyfit(widths, cost, 1)
print(
    f"decode step = {a:.3f} ms + {b:.4f} ms per slot; the holes cost about "
    f"{b * (computed[False] - served[False]):.1f} ms of {a * len(decode_steps[False]) + b * computed[False]:.1f} ms"
)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(widths, cost, "o", label="measured")
ax.plot(widths, a + b * widths, label=f"{a:.3f} + {b:.4f} x width")
ax.set(xlabel="slots computed in the step", ylabel="ms (fastest of 5)", title="cost of a decode step by width")
ax.legend()
show(fig, "04_step_cost_by_width.png")
assert b > 0, "a wider step costs more"

# %% [markdown]
# ## The other layout: paged blocks, where nothing moves
#
# Holes and shuffles come from one choice: a request owns one contiguous
# slot, and a step runs over a contiguous window of them. vLLM chose the
# other way (*PagedAttention*): KV memory is a pool of small **blocks** of
# `block_size` positions, a request gets blocks from the pool as it grows,
# and each lane of a step carries its request's **block table**, the list
# of its blocks, wherever they lie (lesson 2's `Lane.blocks`). The
# attention kernel reads through that table, so there is no window: nothing
# idle is computed and nothing ever moves. A request also holds only the
# blocks its tokens fill, not a whole context, so the same memory fits more
# requests; the price is an indirection in attention, and a pool that can
# run out (the engine then *preempts* the latest request and recomputes it
# later).
#
# `PagedLayout(config, n_blocks, block_size)` is that layout. Given the
# memory of the 16 slots above, the same trace gets the same tokens, with
# no idle row, no move, and a fraction of the memory held.

# %%
from flover.engine import PagedLayout

block_size = 16
paged_layout = PagedLayout(config, 16 * config.n_ctx // block_size, block_size)
paged = Engine(NumpyBackend(config, weights, paged_layout.shape), FusedScheduler(), paged_layout,
               VirtualClock(0.001, 0.002))  # fmt: skip
assert {r.id: r.tokens for r in paged.run(trace)} == tokens[True], "paged blocks change no token either"
assert paged.stats.moves == 0 and sum(step.idle_rows for step in paged.stats.steps) == 0
peak = {"slots": engines[True].stats.peak_kv_bytes, "paged": paged.stats.peak_kv_bytes}
print(f"peak KV memory held: {peak['slots'] / 1e6:.1f} MB in slots, {peak['paged'] / 1e6:.1f} MB in blocks of "
      f"{block_size}; {paged.stats.preemptions} preemptions")  # fmt: skip
assert peak["paged"] < peak["slots"]

# %% [markdown]
# ## What we have
#
# - The fused step computes a **window** of slots; a finished request in the
#   middle leaves a **hole** that is computed for nothing.
# - `shuffle_plan` moves each active slot outside the best window into a hole
#   inside it: the fewest moves possible (checked by brute force on every map
#   of up to 8 slots), and the moves change no logit.
# - Paged KV blocks (vLLM) avoid the window altogether: each lane reads its
#   own block table, so nothing idle is computed and nothing moves, and a
#   request holds only the blocks it fills.
# - All of this relies on one fact used without proof so far: a request's
#   logits do not depend on which other rows share its decode step. Lesson 8
#   shows why that is not automatic, and how flover makes it hold bit for bit.
