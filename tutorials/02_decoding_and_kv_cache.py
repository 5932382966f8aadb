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
# # Lesson 2: decoding and the KV cache
#
# Lesson 1 computed the logits of every position of a text at once. To
# *generate* text, a model runs in a loop: score the next token, pick one,
# append it, repeat. This lesson writes that loop twice, first by
# recomputing everything at every step and then with a **KV cache**, the
# memory that *temporal fusion* is built around (the Flover paper's name for
# running the decode steps of requests that arrived at different times as
# one batched step; lesson 4 builds it). It measures what each costs,
# and checks that the cached loop computes the same logits (to rounding) and
# the same tokens.

# %% [markdown]
# The same two helpers as in lesson 1: `OUT`, the folder for pictures, and
# `show(fig, name)`, which saves a figure there and draws it in Jupyter. This
# lesson times things, so it also asks for one thread per process (below).

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

# The backend below runs its math in *kernels*: small compiled loops, one per
# operation (a matrix product, attention, layer norm). flover compiles them
# with Numba, a library that turns Python loops over NumPy arrays into machine
# code (lesson 8 writes one). NumPy's own `@` hands matrix products to BLAS
# (lesson 1). Both can use several threads; we ask for one per process, set
# before NumPy and Numba load: on a small model and a busy machine, parallel
# kernels spend more time waiting for each other than computing, and timings
# jump. Set these variables yourself to use more threads.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# %% [markdown]
# ## Generating without a cache
#
# The model and its tokenizer come from `flover.loading.resolve(None)` as in
# lesson 1. *Greedy* decoding picks the token with the highest logit. The
# simplest loop feeds the whole text so far to `reference.forward` at every
# step and keeps only the last row of logits.
# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

from flover.loading import resolve
from reference import forward

config, weights, tokenizer = resolve(None)
prompt = np.array(tokenizer.encode("class Point:\n    def __repr__(self):\n"))  # [P]
P, N = len(prompt), 32  # prompt length, tokens to generate


def generate_without_cache(prompt: np.ndarray, n: int) -> tuple[list[int], list[float], int]:
    """Greedy tokens, the time each one took, and how many token rows went through the model."""
    tokens, times, rows = list(prompt), [], 0
    for _ in range(n):
        start = time.perf_counter()
        logits = forward(weights, config, np.array(tokens))  # [len(tokens), V]: every position again
        rows += len(logits)
        tokens.append(int(np.argmax(logits[-1])))
        times.append(time.perf_counter() - start)
    return tokens[len(prompt) :], times, rows


no_cache_tokens, no_cache_times, no_cache_rows = generate_without_cache(prompt, N)
print(repr(tokenizer.decode(prompt.tolist()) + tokenizer.decode(no_cache_tokens)))

# %% [markdown]
# Step i runs the model over P + i tokens, and all but the last row of its
# logits are thrown away. Yet lesson 1 showed that causality makes row t
# depend on tokens 0..t only: the past does not change when a token is
# appended. Inside attention, the only thing a new token needs from the past
# is the past tokens' **keys and values** (step 3 of lesson 1), in every
# layer. Keep them, and each step only has to run the one new token.

# %% [markdown]
# ## The KV cache as slots
#
# `reference.KVSlots(config, n_slots)` preallocates that memory the way
# Flover does: a fixed number of **slots**, one per request being served,
# each big enough for a whole context of `n_ctx` positions. Two arrays, `k`
# and `v`, each of shape
#
#     [n_layer, n_slots, n_head, n_ctx, head_dim]
#
# so `k[layer, slot, head, position]` is one key vector of D numbers.
# (flover's KV memory is in general a pool of *blocks*,
# `reference.KVBlocks(config, KVShape(n_blocks, block_size))`, with `k` and
# `v` of shape [n_layer, n_blocks, n_head, block_size, head_dim]. A Flover
# slot is one block of `n_ctx` positions, which is what `KVSlots` builds;
# lesson 5 meets small blocks, the other choice.)
#
# A **backend** owns the weights and the KV memory and does the math;
# `reference.NumpyBackend(config, weights, n_slots)` is the NumPy one, and
# its cache is `backend.cache`. Every backend does two things (the
# `reference.Backend` protocol), and the engine of later lessons asks for
# nothing else:
#
# - `step(lanes) -> [L, V]`: one step of the model over a list of L
#   **lanes**. A lane, `reference.Lane(blocks, tokens, start)`, is one
#   request's new tokens: `tokens` go in at positions `start`,
#   `start + 1`, ... of the request's KV `blocks` (here its one slot), each
#   writes its keys and values there and attends over positions 0 up to its
#   own. The step returns the logits of each lane's *last* token.
# - `move(src, dst, lengths)`: copy KV blocks, for lesson 5's memory shuffle
#   (moving a request's cache into a free slot, to keep a batch contiguous).
#
# The two classic steps are two shapes of lanes, and every backend has them
# as thin wrappers over `step` (from `reference.LaneBackend`):
#
# - `prefill(slot, tokens) -> [V]`: a whole prompt in one pass, as `forward`
#   does: **one lane of many tokens**, `Lane.of([slot], tokens, 0)`. Its keys
#   and values fill positions 0..P-1 of `slot`, and it returns the logits of
#   its last position;
# - `decode(slots, tokens, positions) -> [B, V]`: a **decode step** for B
#   requests at once: **B lanes of one token each**, lane b feeding
#   `tokens[b]` at `positions[b]` of slot `slots[b]` and attending over
#   positions 0..positions[b] of its own slot.

# %%
from reference import Backend, NumpyBackend

backend = NumpyBackend(config, weights, n_slots=4)
k_cache = backend.cache.k
print("k and v:", k_cache.shape, "=", "[n_layer, n_slots, n_head, n_ctx, head_dim]")
print(f"{2 * k_cache.nbytes / 1e6:.1f} MB for {backend.n_slots} slots of {config.n_ctx} positions")
assert isinstance(backend, Backend)
assert k_cache.shape == (config.n_layer, 4, config.n_head, config.n_ctx, config.head_dim)

# %% [markdown]
# ## Prefill
#
# Prefill the prompt into slot 0: one lane, the whole prompt from position
# 0. Its logits are those of `forward`'s last row, and slot 0 now holds, in layer 0, the keys we computed by hand in
# lesson 1 (layer norm, `c_attn`, the key third, split into heads). They agree
# to rounding, not bit for bit: the backend does its matrix products with the
# batch-invariant kernels of lesson 8, which add in another order than BLAS.
# Positions from P on are still empty. (`prefill` is nothing but that
# one-lane `step`: running the step itself rewrites the same keys and
# returns the same logits.)

# %%
from reference import Lane, ops

logits = backend.prefill(0, prompt)  # [P] -> [V]
assert logits.shape == (config.vocab_size,)
assert np.array_equal(backend.step([Lane.of([0], prompt, 0)]), logits[None])  # 1 lane -> [1, V]
assert np.allclose(logits, forward(weights, config, prompt)[-1], rtol=1e-5, atol=1e-5)

block = weights.blocks[0]
x = weights.wte[prompt] + weights.wpe[np.arange(P)]  # [P, C]
h = ops.layer_norm(x, block.ln_1.g, block.ln_1.b, config.layer_norm_epsilon)  # [P, C]
k = np.split(ops.linear(h, block.c_attn.w, block.c_attn.b), 3, axis=-1)[1]  # [P, C]
assert np.allclose(k_cache[0, 0, :, :P], ops.split_heads(k, config.n_head), rtol=1e-5, atol=1e-5)  # [H, P, D]
assert not k_cache[:, 0, :, P:].any(), "positions past the prompt are untouched"

# %% [markdown]
# ## Decode
#
# Now the loop with the cache: one prefill, then one decode step per token,
# here with a batch of one (B = 1). Each step feeds the token just chosen at
# the next position. We keep the logits of every step to compare them below.
# The very first decode step of a program also loads its compiled kernels,
# so we make one untimed call before timing the loop.


# %%
def generate_with_cache(backend, prompt: np.ndarray, n: int, slot: int = 0):
    """Greedy tokens, the logits that chose each one, and the time each took."""
    start = time.perf_counter()
    logits = backend.prefill(slot, prompt)  # [V]
    tokens, all_logits, times = [int(np.argmax(logits))], [logits], [time.perf_counter() - start]
    position = len(prompt)
    while len(tokens) < n:
        start = time.perf_counter()
        logits = backend.decode(np.array([slot]), np.array([tokens[-1]]), np.array([position]))[0]  # [1, V] -> [V]
        tokens.append(int(np.argmax(logits)))
        all_logits.append(logits)
        times.append(time.perf_counter() - start)
        position += 1
    return tokens, np.array(all_logits), times


backend.decode(np.array([3]), np.array([0]), np.array([0]))  # untimed: the first step loads compiled kernels
cache_tokens, cache_logits, cache_times = generate_with_cache(backend, prompt, N)
print(repr(tokenizer.decode(prompt.tolist()) + tokenizer.decode(cache_tokens)))
assert cache_tokens == no_cache_tokens
assert k_cache[:, 0, :, : P + N - 1].any(axis=(0, 1, 3)).all(), "every fed position now has keys"

# %% [markdown]
# `reference.generate(backend, prompt_ids, max_new_tokens)` is this loop as
# the project writes it. It yields each token as soon as it is made (so a
# caller can stream them), and it is the **serial** ground truth that every
# scheduler in this project (the part of a server that decides which
# requests run in each step) is tested against.

# %%
from reference import generate

assert list(generate(backend, prompt, N)) == cache_tokens

# %% [markdown]
# ## A prompt at once, or one token at a time
#
# A prefill and a decode step are the same computation in two shapes of
# lanes. So a prompt could just as well be fed one token per step, P lanes
# of one token in P steps, as a decode loop would feed it, or in chunks of
# a few tokens (*chunked prefill*, which lesson 4's engine can do). Because
# every row of a step is computed from its own token, position and cached
# keys and values, in an order fixed by those alone (lesson 8 shows how), all
# three give the same last logits, **bit for bit**. One step may also mix
# shapes: a prompt's lane beside a decode lane of another request, each row
# of the result the logits its lane gets alone.

# %%
lanes_backend = NumpyBackend(config, weights, n_slots=3)  # a fresh cache, so slot 0 above stays as it is
at_once = lanes_backend.step([Lane.of([0], prompt, 0)])[0]  # 1 lane of P tokens
for i, token in enumerate(prompt):  # P steps, 1 lane of 1 token each
    one_by_one = lanes_backend.step([Lane.of([1], [token], i)])[0]
for start in range(0, P, 5):  # chunks of 5 tokens
    chunked = lanes_backend.step([Lane.of([2], prompt[start : start + 5], start)])[0]
print(f"prompt of {P} tokens: at once == one token at a time == in chunks of 5, bitwise:",
      np.array_equal(at_once, one_by_one) and np.array_equal(at_once, chunked))  # fmt: skip
assert np.array_equal(at_once, one_by_one) and np.array_equal(at_once, chunked)
assert np.array_equal(lanes_backend.cache.k[:, 0, :, :P], lanes_backend.cache.k[:, 1, :, :P]), "the same keys too"

mixed = lanes_backend.step([Lane.of([0], [cache_tokens[0]], P), Lane.of([2], prompt, 0)])  # a decode and a prefill
assert mixed.shape == (2, config.vocab_size)
assert np.array_equal(mixed[0], cache_logits[1]) and np.array_equal(mixed[1], at_once)

# %% [markdown]
# ## Decode logits equal a fresh forward pass, to rounding
#
# Feed `forward` the prompt and all generated tokens at once. Its row
# P - 1 + i scored the (i+1)-th generated token, so it must match the logits
# of decode step i. It does, but only to rounding: `forward` multiplies whole
# matrices with BLAS, while the backend, in its prefills and decode steps
# alike, uses kernels that add up each sum in a fixed order (the subject of
# lesson 8), and floating-point sums in a different order round
# differently. Against the backend's own prefill of the same text, the last
# decode step is bitwise equal, as the section above promised.

# %%
fresh = forward(weights, config, np.concatenate([prompt, cache_tokens[:-1]]))[P - 1 :]  # [N, V]
diff = np.abs(fresh - cache_logits)
scale = np.abs(fresh).max()
print(
    f"max |difference| {diff.max():.2e} (logits up to {scale:.2f}); bitwise equal entries: {np.mean(fresh == cache_logits):.0%}"
)
assert fresh.shape == cache_logits.shape == (N, config.vocab_size)
assert diff.max() <= 1e-4 * max(scale, 1.0)
assert np.array_equal(fresh.argmax(axis=-1), cache_logits.argmax(axis=-1))
assert np.array_equal(lanes_backend.prefill(1, np.concatenate([prompt, cache_tokens[:-1]])), cache_logits[-1])

# %% [markdown]
# ## Slots hold requests side by side
#
# Slots are independent: prefill other prompts into slots 1, 2 and 3 and
# slot 0 is untouched. The picture shows which positions of each slot hold
# keys (in layer 0, head 0). Every slot reserves all `n_ctx` positions,
# whether its request uses them or not; that fixed layout is what lets a
# fused step address each request by a slot number (lessons 4 and 5).

# %%
before = k_cache[:, 0].copy()
for slot, text in ((1, "import os"), (2, "x = 1"), (3, "class Point:\n    ")):
    backend.prefill(slot, np.array(tokenizer.encode(text)))
assert np.array_equal(k_cache[:, 0], before)

shown = 64
used = k_cache[0, :, 0, :shown].any(axis=-1)  # [n_slots, positions]
fig, ax = plt.subplots(figsize=(9, 2.2))
ax.imshow(used, cmap="Blues", aspect="auto", interpolation="nearest")
ax.set_yticks(range(backend.n_slots), [f"slot {s}" for s in range(backend.n_slots)])
ax.set_xlabel(f"position (first {shown} of n_ctx = {config.n_ctx})")
ax.set_title("KV slots: positions holding keys")
show(fig, "02_kv_slots.png")
assert used.sum(axis=1).tolist()[1:] == [len(tokenizer.encode(t)) for t in ("import os", "x = 1", "class Point:\n    ")]

# %% [markdown]
# ## Sampling
#
# Greedy decoding always picks the top token. `reference.SamplingParams`
# describes the alternatives: divide the logits by a `temperature` (0 means
# greedy), keep only the `top_k` best tokens and the smallest set whose
# probability reaches `top_p`, then draw. A `reference.Sampler` holds one
# request's sampling state: a random generator seeded by the request's own
# `seed`, from which it makes exactly one draw per token. So the same request
# gets the same tokens however it is scheduled, a fact later lessons rely on.
# `generate` takes the parameters as `sampling=`, and `stop_ids`, tokens that
# end the request early (the stop token itself is still returned).

# %%
from reference import Sampler, SamplingParams

params = SamplingParams(temperature=0.8, top_k=40, seed=7)
sampled = list(generate(backend, prompt, N, sampling=params))
print(repr(tokenizer.decode(sampled)))
assert list(generate(backend, prompt, N, sampling=params)) == sampled, "same seed, same tokens"
assert list(generate(backend, prompt, N, sampling=SamplingParams(0.8, 40, seed=8))) != sampled

sampler = Sampler(params)  # generate's loop by hand: prefill, then one decode step and one draw per token
mine = [sampler(backend.prefill(0, prompt))]
while len(mine) < N:
    mine.append(sampler(backend.decode(np.array([0]), np.array([mine[-1]]), np.array([P + len(mine) - 1]))[0]))
assert mine == sampled

newline = tokenizer.encode("\n")[0]
stopped = list(generate(backend, prompt, N, sampling=params, stop_ids=[newline]))
assert stopped == sampled[: len(stopped)] and (stopped[-1] == newline or len(stopped) == N)
assert newline not in stopped[:-1]
print(f"with stop id {newline}: {len(stopped)} tokens, {stopped[-1] == newline and 'ended by the stop id' or 'ran to N'}")

# %% [markdown]
# ## What the cache saves
#
# Count the token rows that pass through the model. Without the cache, step i
# runs P + i rows, N * P + N(N-1)/2 in all; with it, the prefill runs P rows
# and each of the N - 1 decode steps one row. The loop without a cache
# counted its rows as it went; for the cached loop we count the rows of
# every lane the backend's `step` receives, by wrapping that method while
# the loop runs again.

# %%
fed = []
plain_step = backend.step
backend.step = lambda lanes: fed.append(sum(len(lane.tokens) for lane in lanes)) or plain_step(lanes)
assert generate_with_cache(backend, prompt, N)[0] == cache_tokens
del backend.step  # back to the class's own method
rows_with = sum(fed)
print(f"P = {P}, N = {N}: {no_cache_rows} rows without the cache, {rows_with} with it "
      f"({no_cache_rows / rows_with:.1f}x), in {len(fed)} steps")  # fmt: skip
assert no_cache_rows == N * P + N * (N - 1) // 2
assert (rows_with, len(fed)) == (P + N - 1, N), "one prefill of P rows, then decode steps of one row"

# %% [markdown]
# And in time: the two loops above timed every token. Without the cache a
# step gets slower as the text grows, since it runs every row again; with
# it, after the prefill, a step runs one row and grows only by reading one
# more cached key and value per position. (These are wall-clock times on
# your machine, so the exact figures will vary from run to run.)

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(np.cumsum(no_cache_times) * 1e3, label="recompute everything (no cache)")
ax.plot(np.cumsum(cache_times) * 1e3, label="prefill + decode with the KV cache")
ax.set_xlabel("tokens generated")
ax.set_ylabel("cumulative time (ms)")
ax.legend()
show(fig, "02_cache_vs_recompute.png")
print(f"without cache {sum(no_cache_times) * 1e3:.1f} ms, with cache {sum(cache_times) * 1e3:.1f} ms for {N} tokens")
assert sum(cache_times) < sum(no_cache_times)

# %% [markdown]
# Single runs are noisy on a busy machine, so to compare costs we time each
# call several times and keep the fastest (`best_ms`). Three costs, at
# context lengths L:
#
# - `forward` over L tokens: one step of the loop without a cache;
# - `prefill` of L tokens, divided by L: the cost per prompt token;
# - one `decode` step at position L: the cost per generated token.
#
# A forward pass over L tokens grows with L (every linear layer sees L rows;
# attention compares L x L pairs), while a decode step at position L runs one
# row and reads L cached keys and values: it grows too, but far more slowly.
# A prefill of L tokens does the work of L rows in one step: it reads every
# weight once for all L of them, where L decode steps read every weight L
# times, and its matrix products keep the processor busier. So it costs far
# less per token than a decode step. Batching many requests into one decode
# step (lesson 4) shares that read in the same way; lesson 3 counts the
# bytes and the arithmetic, and shows on which machines it matters most.


# %%
def best_ms(fn, *args, repeats: int = 5) -> float:
    """The fastest of a few calls fn(*args), in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


lengths = [16, 64, 128, min(224, config.n_ctx - 1)]
ids = np.resize(prompt, config.n_ctx)  # a long token sequence to cut prefixes from
backend.prefill(0, ids[: lengths[-1]])  # fill slot 0 up to the longest length
costs = {"forward": [], "prefill per token": [], "decode step": []}
for L in lengths:
    costs["forward"].append(best_ms(forward, weights, config, ids[:L]))
    costs["prefill per token"].append(best_ms(backend.prefill, 1, ids[:L]) / L)
    costs["decode step"].append(best_ms(backend.decode, np.array([0]), ids[L - 1 : L], np.array([L - 1])))
for name, ms in costs.items():
    print(f"{name:18s}", "  ".join(f"L={L}: {t:7.3f} ms" for L, t in zip(lengths, ms)))

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, ms in costs.items():
    ax.plot(lengths, ms, marker="o", label=name)
ax.set_xlabel("context length L")
ax.set_ylabel("ms (fastest of 5)")
ax.set_yscale("log")
ax.legend()
show(fig, "02_costs.png")
growth = {name: ms[-1] / ms[0] for name, ms in costs.items()}
print(f"from L={lengths[0]} to L={lengths[-1]}: forward x{growth['forward']:.1f}, decode step x{growth['decode step']:.1f}")
assert growth["forward"] > 2 * growth["decode step"], "a cached step grows far more slowly than recomputing"
assert all(d < f for d, f in zip(costs["decode step"][1:], costs["forward"][1:])), "and is cheaper past a few tokens"
per_token = [p / d for p, d in zip(costs["prefill per token"], costs["decode step"])]
print("prefill per token / decode step:", "  ".join(f"L={L}: {r:.2f}" for L, r in zip(lengths, per_token)))
assert max(per_token) < 0.5, "a prompt token costs far less in a prefill than a token costs in a decode step"

# %% [markdown]
# ## What we have
#
# - Generation is a loop of one **prefill** (the prompt, all at once) and
#   **decode** steps (one token each), both on a **backend** that keeps each
#   request's keys and values in a **slot** of the **KV cache**.
# - Both are one `step` over a list of **lanes**: a prefill is one lane of
#   many tokens, a decode step lanes of one token each, and a prompt fed at
#   once, in chunks or token by token gives the same logits bit for bit.
# - A decode step takes a *batch*: `decode(slots, tokens, positions)` serves
#   B requests, each in its own slot at its own position. Lesson 4 uses
#   exactly that to serve requests that arrive at different times.
