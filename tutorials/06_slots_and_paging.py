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
# # Lesson 6: slots and paging
#
# Lesson 5 kept every request in a slot of `n_ctx` positions and closed
# the holes that departures leave with Flover's memory shuffle; it ended on
# the other way to lay out KV memory, vLLM's paged blocks. This lesson puts
# the two side by side: the same requests, the same engine, and the same
# amount of KV memory. We measure how much memory each reserves without
# using it, how many requests each runs at once, and what each pays for its
# choice (copies for the shuffle; block tables and recomputed requests for
# paging), and we check that both compute the same tokens and the same
# logits, bit for bit.

# %% [markdown]
# The helpers of lesson 2: `show(fig, name)` for pictures, and one thread
# per process, since this lesson times a few steps.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# One thread per process, set before NumPy and Numba load: on a small model and a
# busy machine, parallel kernels spend more time waiting for each other than
# computing, and timings jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## One budget, two layouts
#
# A server has a fixed amount of memory for KV caches: its **KV budget**.
# Every cached position costs `2 * n_layer * n_embd` floats (K and V in every
# layer), `reference.kv.bytes_per_position(config)` bytes. A policy of lesson
# 4 takes the budget as `PolicyConfig(kv_memory_gib=...)` and cuts it in one
# of two ways, `kv="slots"` or `kv="paged"`:
# %%
from flover.runner import PolicyConfig

print(inspect.getsource(PolicyConfig.layout))

# %% [markdown]
# - **slots** (`SlotLayout`, Flover's): as many slots of `n_ctx` positions as
#   fit. A request holds one slot from its admission to its last token, so
#   the budget caps the number of requests in flight at the number of slots.
# - **paged** (`PagedLayout`, vLLM's PagedAttention): as many blocks of
#   `block_size` positions as fit, in one pool. A request holds the blocks
#   its positions fill so far, taken from the pool one at a time as it grows.
#
# Our model (lesson 1's shipped one) has `n_ctx` = 256, so a slot is 256
# positions. Give the server four slots' worth of memory, and paging cuts
# the same bytes into 64 blocks of 16 positions.

# %%
from flover.loading import resolve
from reference.kv import bytes_per_position

config, weights, tokenizer = resolve(None)
BLOCK, SLOTS = 16, 4
per_position = bytes_per_position(config)
BUDGET_GIB = SLOTS * config.n_ctx * per_position / 2**30
layouts = {kv: PolicyConfig("fused", kv=kv, block_size=BLOCK, kv_memory_gib=BUDGET_GIB).layout(config)
           for kv in ("slots", "paged")}  # fmt: skip
for kv, layout in layouts.items():
    print(f"{kv:5s}: {type(layout).__name__}, {layout.shape.n_blocks} blocks of {layout.shape.block_size} positions")
positions = {kv: layout.shape.n_blocks * layout.shape.block_size for kv, layout in layouts.items()}
print(f"{per_position} bytes per position; {BUDGET_GIB * 2**30 / 2**20:.0f} MiB = {positions['slots']} positions either way")
assert positions["slots"] == positions["paged"] == SLOTS * config.n_ctx

# %% [markdown]
# ## A block table, by hand
#
# A paged request's positions are spread over blocks that lie anywhere in
# the pool. Its **block table** lists them in order: position p is at offset
# `p % block_size` of block `blocks[p // block_size]`. That is what
# `reference.Lane.blocks` carries (lesson 2), and the attention of every
# lane reads its cached K and V through it.
#
# Prefill one prompt of a few dozen tokens twice: in slot 0 of a slot
# backend, and in three scattered blocks of a paged backend. Then look its
# keys up by hand through the table: they are the slot's keys, and the
# logits are the same bits.

# %%
from reference import KVShape, Lane, NumpyBackend

prompt = np.array(tokenizer.encode("def area(self):\n    return self.w * se"))
slot_backend = NumpyBackend(config, weights, 1)
paged_backend = NumpyBackend(config, weights, KVShape(12, BLOCK))
table = np.array([7, 2, 9])  # 3 blocks of 16 hold positions 0..47
in_slot = slot_backend.step([Lane.of([0], prompt, 0)])
in_blocks = paged_backend.step([Lane.of(table, prompt, 0)])
p = np.arange(len(prompt))
keys = paged_backend.cache.k[:, table[p // BLOCK], :, p % BLOCK]  # [P, n_layer, n_head, head_dim]
print(f"prompt of {len(prompt)} tokens in blocks {table.tolist()}; logits equal bitwise: {np.array_equal(in_slot, in_blocks)}")
assert np.array_equal(keys, slot_backend.cache.k[:, 0, :, : len(prompt)].transpose(2, 0, 1, 3))
assert np.array_equal(in_slot, in_blocks)

# %% [markdown]
# ## The trace: requests much shorter than n_ctx
#
# Requests are often far shorter than the model's context. Make a trace of
# such requests (lesson 4's `poisson_trace`): prompts of 4
# to 24 tokens, 8 to 64 new tokens, so no request needs more than 88 of the
# 256 positions a slot reserves, arriving faster than four slots can serve.

# %%
from flover.trace import poisson_trace

trace = poisson_trace(400.0, 32, prompt_len=(4, 24), output_len=(8, 64), seed=2, vocab_size=config.vocab_size)
longest = max(len(r.prompt_ids) + r.max_new_tokens for r in trace)
print(f"{len(trace)} requests over {trace[-1].arrival_s * 1e3:.0f} ms; the longest needs {longest} positions of {config.n_ctx}")

# %% [markdown]
# ## When the pool runs short
#
# Paging admits a request when the pool holds its prompt plus one block to
# grow into (`can_admit`), and gives it a block whenever its positions cross
# into a new one (`grow`):

# %%
from flover.engine import Engine, PagedLayout

print(inspect.getsource(PagedLayout.can_admit))
print(inspect.getsource(PagedLayout.grow))

# %% [markdown]
# Nobody knows in advance how long a request will run, so admitting by what
# is free now is a bet: many requests admitted together may later all want
# a new block when the pool is empty. Then the engine **preempts** the
# request admitted last: takes all its blocks back, keeps its tokens, and
# puts it at the front of the queue. When it comes back it is prefilled
# again, prompt and generated tokens together (vLLM's *recompute*), and
# continues where it stopped. Slots never preempt: a slot holds a whole
# context from the start.

# %%
print(inspect.getsource(Engine._grow))
print(inspect.getsource(Engine._preempt))

# %% [markdown]
# ## Serving the trace both ways
#
# We drive the engine directly (lesson 5 did too) rather than through
# `run_policy`, for two things we want to watch:
#
# - `on_token`, a function the engine calls with a request's state
#   (`RequestState`) after each token it samples: we note how many positions
#   the request has cached, step by step;
# - the clock: lesson 4's `VirtualClock`, where a decode step costs the same
#   whatever its batch (as on a GPU, lesson 3), subclassed to also count the
#   positions the shuffle copies (the engine reports each shuffle's copies to
#   `clock.spend_move`).
#
# Both runs keep their logits (`keep_logits=True`) so we can compare them.

# %%
from collections import defaultdict

from flover.backends import BackendFactory
from flover.clock import VirtualClock
from flover.metrics import summarize

make_backend = BackendFactory("numpy", config, weights)


class CopyCountingClock(VirtualClock):
    """Lesson 4's virtual clock that also counts the positions the memory shuffle copies."""

    def __init__(self) -> None:
        super().__init__(step_s=0.001, prefill_s=0.002)
        self.copied = 0

    def spend_move(self, lengths) -> None:
        self.copied += int(np.sum(lengths))


def serve(kv: str):
    """-> the engine, its results by request id, and the positions cached by each request that sampled in each step."""
    layout = PolicyConfig("fused", kv=kv, block_size=BLOCK, kv_memory_gib=BUDGET_GIB).layout(config)
    cached = defaultdict(list)  # step index -> [positions cached by each request that sampled in it]
    engine = Engine(make_backend(layout.shape), PolicyConfig("fused").scheduler(), layout, CopyCountingClock(),
                    keep_logits=True, on_token=lambda s: cached[len(engine.stats.steps) - 1].append(s.cached))  # fmt: skip
    results = {r.id: r for r in engine.run(trace)}
    return engine, results, cached


runs = {kv: serve(kv) for kv in ("slots", "paged")}

# %% [markdown]
# ## Same tokens, same logits
#
# The layouts decide where K and V live and when a request runs; they must
# never change what it computes. Every request's tokens agree, and so does
# every row of logits, bit for bit, those of the preempted requests
# included: their recomputed prompts gave the logits they had before.

# %%
(slot_engine, slot_results, _), (paged_engine, paged_results, _) = runs["slots"], runs["paged"]
preempted = [i for i, r in paged_results.items() if r.preempted]
for i, r in slot_results.items():
    assert r.tokens == paged_results[i].tokens, f"request {i}: tokens differ"
    assert all(np.array_equal(a, b) for a, b in zip(r.logits, paged_results[i].logits, strict=True)), f"request {i}"
print(f"all {len(trace)} requests: tokens and logits bitwise equal; {len(preempted)} were preempted under paging")
assert preempted and not any(r.preempted for r in slot_results.values())

# %% [markdown]
# ## Reserved against used
#
# Now count, at every decode step, the KV positions the requests use (what
# they have cached) and the positions their layout reserves for them: a
# slot reserves `n_ctx` whatever its request uses, a paged request its
# positions rounded up to whole blocks. Reserved but unused memory is
# **fragmentation** (internal fragmentation, strictly: waste inside what a
# request holds). The engine records, in each `Step`, the KV bytes held
# (`kv_bytes`); our count must agree with it.


# %%
def reserved_positions(kv: str, cached: list[int]) -> int:
    if kv == "slots":
        return len(cached) * config.n_ctx
    return sum(-(-c // BLOCK) * BLOCK for c in cached)  # each request's positions, rounded up to blocks


memory = {}  # kv -> (times, used, reserved, requests) at each decode step
for kv, (engine, _, cached) in runs.items():
    decode = [i for i, s in enumerate(engine.stats.steps) if s.rows > s.prefill_rows]
    for i in decode:
        assert reserved_positions(kv, cached[i]) * per_position == engine.stats.steps[i].kv_bytes, (kv, i)
    memory[kv] = tuple(np.array(column) for column in zip(*[
        (engine.stats.steps[i].start_s, sum(cached[i]), reserved_positions(kv, cached[i]), len(cached[i])) for i in decode
    ]))  # fmt: skip
waste = {kv: 1 - used.sum() / reserved.sum() for kv, (_, used, reserved, _) in memory.items()}
print("our count of reserved positions equals the engine's kv_bytes at every decode step")
print(", ".join(f"{kv}: {w:.0%} of the reserved positions unused" for kv, w in waste.items()))
assert waste["slots"] > 0.5 > 0.25 > waste["paged"]

# %% [markdown]
# The picture: for each layout (left, right), the positions reserved and
# used over time (top), and the requests in each decode step (bottom), both
# runs on the same virtual clock.

# %%
fig, axes = plt.subplots(2, 2, figsize=(11, 5.5), sharex=True, sharey="row")
for column, (kv, (times, used, reserved, requests)) in enumerate(memory.items()):
    top, bottom = axes[0, column], axes[1, column]
    top.fill_between(times, reserved, step="post", color="#f28e2b", alpha=0.35, label="reserved")
    top.fill_between(times, used, step="post", color="#4e79a7", label="used (cached)")
    top.axhline(positions[kv], color="grey", linestyle="--", linewidth=0.8, label="the budget")
    top.set_title(f"{kv}: {waste[kv]:.0%} of reserved unused, {runs[kv][0].stats.preemptions} preemptions")
    bottom.step(times, requests, where="post", color="#4e79a7")
    bottom.set_xlabel("time (s, virtual clock: modelled)")
axes[0, 0].set_ylabel("KV positions")
axes[1, 0].set_ylabel("requests in the decode step")
axes[0, 0].legend(fontsize=8, loc="upper right")
show(fig, "06_slots_and_paging.png")

# %% [markdown]
# With slots, four requests run at a time and most of what they reserve
# stays empty. Paging fits the same bytes around the requests' real
# lengths: several times as many run at once, until the pool is full and
# it preempts. On this clock a step costs the same at any batch, so running
# more requests at once finishes the trace sooner.

# %%
metrics = {kv: summarize(list(results.values()), engine.stats) for kv, (engine, results, _) in runs.items()}
for kv, m in metrics.items():
    print(f"{kv:5s}: {m['decode_steps']} decode steps, mean batch {m['mean_batch']:.1f}, makespan {m['makespan_s']:.3f} s, "
          f"mean latency {m['latency_s']['mean']:.3f} s")  # fmt: skip
assert metrics["paged"]["mean_batch"] > 2 * metrics["slots"]["mean_batch"]
assert metrics["paged"]["makespan_s"] < metrics["slots"]["makespan_s"]

# %% [markdown]
# ## What each pays
#
# Neither computes a row for no one (lesson 5: the shuffle leaves no hole,
# and paging has no window). Their costs lie elsewhere:
#
# - **slots with the shuffle** copy: each move copies a request's cached
#   positions to another slot, in every layer;
# - **paging** recomputes: every row of a preempted request is computed again
#   when it is readmitted, beyond the prompts every run must compute.

# %%
copied = slot_engine.clock.copied
recomputed = {kv: m["rows"] - m["idle_rows"] - m["tokens"] + len(trace) - sum(len(r.prompt_ids) for r in trace)
              for kv, m in metrics.items()}  # fmt: skip
print(f"slots: {slot_engine.stats.moves} moves copied {copied} positions ({copied * per_position / 2**20:.1f} MiB); "
      f"{recomputed['slots']} rows recomputed")  # fmt: skip
print(f"paged: {paged_engine.stats.moves} moves; {paged_engine.stats.preemptions} preemptions recomputed "
      f"{recomputed['paged']} rows")  # fmt: skip
assert copied > 0 and paged_engine.stats.moves == 0
assert recomputed["slots"] == 0 < recomputed["paged"]

# %% [markdown]
# Paging pays one more thing in every step: each lane carries a block
# table, which the backend checks and turns into addresses, and attention
# reads K and V through it, a jump to another block every 16 positions,
# where a slot is one run of memory. Time a decode step of 16 requests
# both ways on this CPU (fastest of many tries, as in lesson 3), at a short
# and a long context: the slots in order, the blocks shuffled across the
# pool.

# %%
import timeit

lanes = 16
slot_probe = NumpyBackend(config, weights, lanes)
paged_probe = NumpyBackend(config, weights, KVShape(lanes * config.n_ctx // BLOCK, BLOCK))
tables = np.random.default_rng(0).permutation(lanes * config.n_ctx // BLOCK).reshape(lanes, -1)  # scattered blocks
indirection = {}
for position in (32, 240):
    steps = {"slots": (slot_probe, [Lane.of([i], [1], position) for i in range(lanes)]),
             "paged": (paged_probe, [Lane.of(tables[i], [1], position) for i in range(lanes)])}  # fmt: skip
    best = {"slots": np.inf, "paged": np.inf}
    for _ in range(30):  # one call of each in turn, so a busy moment does not hit one layout only
        for kv, (probe, step) in steps.items():
            best[kv] = min(best[kv], timeit.timeit(lambda p=probe, s=step: p.step(s), number=1))
    indirection[position] = best["paged"] / best["slots"]
    print(f"position {position:3d}: slots {best['slots'] * 1e3:.2f} ms, paged {best['paged'] * 1e3:.2f} ms "
          f"({indirection[position]:.2f}x)")  # fmt: skip
assert indirection[240] > 1.05, "block tables cost time at long contexts"

# %% [markdown]
# On this CPU the block tables cost little at short contexts and more as
# the context grows. A GPU's attention kernel pays it too (vLLM's PagedAttention
# reads each block through the table). The block size trades the two
# costs: larger blocks mean fewer lookups, but more reserved positions left
# unused at the end of each request.
#
# ## What we have
#
# - With the same KV memory, **slots** reserve a whole context per request
#   and cap the batch at the number of slots; **paged blocks** reserve a
#   request's positions rounded up to a block, so far less memory sits idle
#   (**fragmentation**) and many more requests run at once.
# - A block table maps position p to block `blocks[p // block_size]`, offset
#   `p % block_size`; where the blocks lie changes no logit.
# - Paging admits requests on a bet about their length; when the pool runs
#   out it **preempts** the latest and **recomputes** it later. Slots never
#   preempt, but the shuffle copies KV memory to keep the batch contiguous.
# - Both layouts compute the same tokens and the same logits, bit for bit.
