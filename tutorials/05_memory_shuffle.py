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
# The fused engine of lesson 4 kept each request in a KV slot and ran one
# decode step over all of them, one lane per request, wherever its slot
# lay. A GPU's fused step is not so free: Flover runs it over a contiguous
# **window** of slots. This lesson looks at that window: how **holes**
# appear in it when requests leave, why a hole costs as much as a request,
# and Flover's **memory shuffle**, which moves the fewest slots needed to
# close the holes. We check that the shuffle's plan is minimal by brute
# force and that moving a slot changes no logit; then we write Flover's KV
# layout, window, holes and shuffle, check it against flover's own, and
# measure what the shuffle saves on this CPU.

# %% [markdown]
# The helpers of lesson 2: `show(fig, name)` for pictures, and one thread
# per process for steady timings.

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
# address every active slot. On a GPU each op of the step is a kernel
# (lessons 2 and 3) whose threads each take one request's row. The simple
# and fast way to hand a kernel its requests is a **window**, one
# contiguous range of slots: the kernel then needs only the address in
# memory where the window's first slot begins (a *base pointer*) and a
# count, and thread b works on the slot b places further on.
# `flover.engine.shuffle.window(active)` is that range, `(first, last + 1)`
# of the active slots. A free slot inside the window is a **hole**: the
# kernel computes it like a request, for nothing.
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
k = sum(active)
print(f"k = {k}, best window starts at {best_window(active)}; moves: {plan}")
print(f"packing to the left (slots 0..{k - 1}) would move the {sum(active[k:])} active slots from {k} on")
assert contiguous(after)
assert best_window(active) == 2 and plan == [(0, 2), (10, 5)]

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


draw_shuffle(active, plan, "05_shuffle_plan.png")

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
# every layer. (Its position and its sampler live in the engine's record of
# the request, lesson 4's `InFlight`, so only the note of where the request
# lives changes.) `backend.move(src, dst, lengths)`, the second method of
# lesson 2's `Backend` protocol, copies the first `lengths[i]` positions of
# block `src[i]` into block `dst[i]`, in every layer; here a block is a
# slot. It costs `2 * n_layer * n_head * head_dim * 4` bytes per position.
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
# ## Flover's slots, by hand
#
# Lesson 4's engine took the lowest free slot and computed one lane per
# request. Add the window, and where a request lives starts to matter: which
# slot a newcomer gets, which lanes a step computes besides the requests'
# own, and what moves after a request leaves. flover's engine (whose loop
# lesson 4 showed is ours) leaves exactly these questions to its **KV
# layout**, an object it asks:
#
# - `can_admit(state)` and `admit(state)`: is there room for a newcomer, and
#   put it there (a request's state is flover's `RequestState`, lesson 4's
#   `InFlight`: `ids` are its prompt and then its generated tokens, `cached`
#   counts those whose K and V its slot holds);
# - `blocks(state)`: where its KV lives, for its lanes (lesson 2's
#   `Lane.blocks`: here its one slot);
# - `idle_lanes()`: the lanes a decode step computes for no one. A hole is
#   computed as the window kernel would compute it: the departed request's
#   last lane again, its last token attending over its last length. So a
#   hole costs exactly what that request cost in the batch;
# - `release(state)`: a request leaves;
# - `compact()`: after each iteration, the moves `(source, destination,
#   positions)` that the engine hands to `backend.move`. With the shuffle,
#   `shuffle_plan`'s moves; without it, none, and the holes stay.
#
# (`check_fits` and `grow` matter for memory cut into pages, lesson 6: a
# slot always has room for a whole context. `shape` is the KV memory the
# backend must have, `held_bytes` the memory requests hold.)

# %%
from reference import KVShape, Lane


class WindowSlots:
    """Flover's KV layout: one slot per request, steps over the window, holes closed by the shuffle (or not)."""

    def __init__(self, config, n_slots: int, shuffle: bool) -> None:
        self.shape = KVShape.slots(config, n_slots)  # n_slots blocks of n_ctx positions
        self.slot_bytes = self.shape.block_bytes(config)
        self.shuffle = shuffle
        self.slots = [None] * n_slots  # the request in each slot
        self.last_lane = [None] * n_slots  # (token, position) of the request that last left each slot

    @property
    def active(self) -> list[bool]:
        return [state is not None for state in self.slots]

    def can_admit(self, state) -> bool:
        return None in self.slots

    def admit(self, state) -> None:
        slot = choose_slot(self.active)
        self.slots[slot], self.last_lane[slot] = state, None

    def blocks(self, state) -> np.ndarray:
        return np.array([self.slots.index(state)])

    def idle_lanes(self) -> list[Lane]:
        first, last = window(self.active)
        holes = [i for i in range(first, last) if self.slots[i] is None]
        return [Lane.of([i], [self.last_lane[i][0]], self.last_lane[i][1]) for i in holes]

    def release(self, state) -> None:
        slot = self.slots.index(state)
        self.slots[slot] = None
        self.last_lane[slot] = (state.ids[state.cached - 1], state.cached - 1)

    def compact(self) -> list[tuple[int, int, int]]:
        plan = shuffle_plan(self.active) if self.shuffle else []
        for source, destination in plan:
            self.slots[destination], self.slots[source] = self.slots[source], None
        return [(source, destination, self.slots[destination].cached) for source, destination in plan]

    def check_fits(self, request) -> None:
        """A slot holds a whole context."""

    def grow(self, state, n: int) -> bool:
        return True

    def held_bytes(self) -> int:
        return sum(self.active) * self.slot_bytes


# %% [markdown]
# Serve one Poisson trace with widely varying output lengths, under lesson
# 4's virtual clock, with our layout and with flover's, `SlotLayout(config,
# n_slots, shuffle)`, each with and without the shuffle, in flover's engine
# with lesson 4's fused scheduler. `engine.stats` records every step (a
# `Step`, lesson 4: `batch` requests served, `rows` computed, of which
# `idle_rows` for no one and `prefill_rows` for prompts, and the time) and
# the number of slot `moves`. To see more than results, `serve` wraps the
# backend in `Traced`, which notes every call the engine makes to it: each
# lane of each step (its blocks, tokens and start), idle lanes included,
# and each move. Ours and flover's must make the same calls and agree on
# every step, token and logit, bit for bit.

# %%
from flover.clock import VirtualClock
from flover.engine import Engine, FusedScheduler, SlotLayout
from flover.trace import poisson_trace


class Traced:
    """A backend that notes every call it gets: the lanes of each step, the (source, destination, length) of each move."""

    def __init__(self, backend) -> None:
        self.backend, self.config, self.kv = backend, backend.config, backend.kv
        self.calls: list[tuple] = []

    def step(self, lanes: list[Lane]) -> np.ndarray:
        self.calls.append(("step", [(tuple(lane.blocks), tuple(lane.tokens), lane.start) for lane in lanes]))
        return self.backend.step(lanes)

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        self.calls.append(("move", list(zip(src.tolist(), dst.tolist(), lengths.tolist()))))
        self.backend.move(src, dst, lengths)


SLOTS = 16
trace = poisson_trace(150.0, 24, prompt_len=(4, 16), output_len=(2, 96), seed=3, vocab_size=config.vocab_size)


def serve(layout) -> Engine:
    backend = Traced(NumpyBackend(config, weights, layout.shape))
    engine = Engine(backend, FusedScheduler(), layout, VirtualClock(0.001, 0.002), keep_logits=True)
    engine.run(trace)
    return engine


engines, tokens = {}, {}
for shuffle in (False, True):
    ours, theirs = serve(WindowSlots(config, SLOTS, shuffle)), serve(SlotLayout(config, SLOTS, shuffle))
    assert ours.backend.calls == theirs.backend.calls, f"shuffle={shuffle}: other lanes or moves"
    assert ours.stats == theirs.stats, f"shuffle={shuffle}: other step records"
    mine = {r.id: r for r in ours.done}
    for r in theirs.done:
        assert mine[r.id].tokens == r.tokens and all(map(np.array_equal, mine[r.id].logits, r.logits)), r.id
    engines[shuffle], tokens[shuffle] = theirs, {r.id: r.tokens for r in theirs.done}
assert tokens[True] == tokens[False], "the shuffle changes no token"
print("our layout and flover's: the same lanes, moves, steps, tokens and logits, with the shuffle and without")

# %% [markdown]
# Here is flover's layout, method by method, and the engine's `_compact`,
# which applies the moves. It differs from ours in three small ways: it
# keeps a dictionary from request to slot instead of searching the list;
# its `high_water` and `pad_batch` serve dynamic batching (lesson 4), whose
# padding is every slot used since the batch began; and with the shuffle it
# returns no idle lane at all, where ours still looks for holes (and, as
# the equal calls above show, finds none).

# %%
import inspect

for part in (SlotLayout.admit, SlotLayout.release, SlotLayout.idle_lanes, SlotLayout.compact, Engine._compact):
    print(inspect.getsource(part))

# %% [markdown]
# ## What the shuffle saves in rows
#
# Count the decode steps' rows: requests served (`batch`) against rows
# computed. With the shuffle the two are equal: our layout looked for holes
# before every decode step and, its steps being flover's, found none.

# %%
decode_steps = {s: [step for step in e.stats.steps if step.prefill_rows == 0] for s, e in engines.items()}
computed = {s: sum(step.rows for step in steps) for s, steps in decode_steps.items()}
served = {s: sum(step.batch for step in steps) for s, steps in decode_steps.items()}
for s, e in engines.items():
    print(f"shuffle={s!s:5}: {len(decode_steps[s])} decode steps, {served[s]} tokens decoded, {computed[s]} rows "
          f"computed, {e.stats.moves} moves")  # fmt: skip
assert served[False] < computed[False], "without the shuffle, holes were computed"
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
show(fig, "05_rows_vs_batch.png")

# %% [markdown]
# ## What the shuffle saves in time
#
# Rows are not time: a step also has costs that do not grow with its
# width, and the shuffle's moves are copies that take time of their own.
# So measure it. `Traced` noted every call of the runs above, steps and
# moves; replay both runs' calls on fresh backends and time each call. The
# machine is shared, so the two runs take turns call by call (a busy moment
# slows both alike), the replay is done three times, and each call keeps
# its fastest time. (Flover measured 1.29x to 1.93x from shuffling on a GPU,
# on variable-length workloads.)

# %%
import time


def replay_s(runs: dict[bool, list[tuple]], repeats: int = 3) -> dict[bool, float]:
    """Seconds each run's calls take on a fresh backend: the runs take turns call by call, each call its fastest."""
    best = {name: np.full(len(calls), np.inf) for name, calls in runs.items()}
    for _ in range(repeats):
        backends = {name: NumpyBackend(config, weights, SLOTS) for name in runs}
        for i in range(max(map(len, runs.values()))):
            for name, calls in runs.items():
                if i >= len(calls):
                    continue
                kind, args = calls[i]
                if kind == "step":
                    lanes = [Lane.of(*lane) for lane in args]
                    start = time.perf_counter()
                    backends[name].step(lanes)
                else:
                    src, dst, lengths = (np.array(column) for column in zip(*args))
                    start = time.perf_counter()
                    backends[name].move(src, dst, lengths)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: float(b.sum()) for name, b in best.items()}


busy_s = replay_s({shuffle: engine.backend.calls for shuffle, engine in engines.items()})
saved = 1 - busy_s[True] / busy_s[False]
print(f"time in steps and moves: {busy_s[False]:.3f} s without the shuffle, {busy_s[True]:.3f} s with it: "
      f"{saved:.0%} saved, for {1 - served[False] / computed[False]:.0%} of the rows")  # fmt: skip
assert busy_s[True] < 0.9 * busy_s[False], "on this CPU too, the shuffle saves time"

# %% [markdown]
# The time saved need not match the rows saved: a step's fixed costs are
# paid with holes or without, while a hole's row attends over its departed
# request's whole final length, more than an average row.
#
# ## The other way: pages
#
# Holes and shuffles come from one choice: a request owns one contiguous
# slot that holds a whole context, and a step runs over a contiguous window
# of them. vLLM chose the other way: KV memory in small blocks, each lane
# reading its own list of blocks wherever they lie, so nothing idle is
# computed and nothing ever moves. Lesson 6 compares the two at the same KV
# memory.
#
# ## What we have
#
# - The fused step computes a **window** of slots; a finished request in the
#   middle leaves a **hole** that is computed for nothing.
# - `shuffle_plan` moves each active slot outside the best window into a hole
#   inside it: the fewest moves possible (checked by brute force on every map
#   of up to 8 slots), and the moves change no logit.
# - We wrote Flover's KV layout (slot map, window, holes, shuffle) and it
#   made flover's engine take the same steps and moves as flover's
#   `SlotLayout`, with the same tokens and logits bit for bit. On a trace
#   with varied output lengths, the shuffle removed every idle row and, on
#   this CPU, measurably shortened the run.
# - All of this relies on one fact used without proof so far: a request's
#   logits do not depend on which other rows share its decode step. Lesson 8
#   shows why that is not automatic, and how flover makes it hold bit for bit.
