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
# # Lesson 8: batch invariance
#
# Lessons 4 and 5 asserted that every policy returns *the same tokens* as
# serial decoding, and lesson 5 that moving a request to another slot and
# another row of the batch changes *no logit, bit for bit*. Neither is
# automatic. This lesson shows why batching normally changes floating-point
# results, and how flover's kernels make a request's logits independent of
# the batch it shares, so that fused decoding equals serial decoding
# exactly.

# %% [markdown]
# The helpers of lesson 1 (`OUT`, `show`, `show_file`). This lesson leaves
# the number of Numba threads free at first, to show it changes nothing, and
# keeps BLAS on one thread.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads


import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py

# %% [markdown]
# ## Floating-point addition is not associative
#
# A float32 carries 24 significant bits. Every addition rounds its exact
# result to the nearest float32, so where the rounding happens depends on the
# order of the additions. Near 10^8 consecutive float32 values are 8 apart,
# so adding 1 to -10^8 rounds straight back to -10^8:

# %%
a, b, c = np.float32(1e8), np.float32(-1e8), np.float32(1.0)
print(f"(a + b) + c = {(a + b) + c}, a + (b + c) = {a + (b + c)}; float32 spacing at 1e8: {np.spacing(a)}")
assert (a + b) + c == 1 and a + (b + c) == 0 and np.spacing(a) == 8

# %% [markdown]
# The same happens, one unit in the last place at a time, in any sum of
# ordinary numbers: 0.1, 0.2 and 0.3 as float64 already disagree.

# %%
assert (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)
print(f"(0.1 + 0.2) + 0.3 = {(0.1 + 0.2) + 0.3!r}, 0.1 + (0.2 + 0.3) = {0.1 + (0.2 + 0.3)!r}")

# %% [markdown]
# Summing many numbers, every order gives its own answer: one after another
# (what `np.add.accumulate` does), NumPy's pairwise `np.sum`, the same
# numbers backwards, or sorted.

# %%
values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
sums = {
    "one by one": np.add.accumulate(values)[-1],
    "pairwise (np.sum)": np.sum(values),
    "backwards": np.add.accumulate(values[::-1])[-1],
    "sorted": np.add.accumulate(np.sort(values))[-1],
}
exact = np.sum(values.astype(np.float64))
for name, total in sums.items():
    print(f"{name:18s} {total!s:>10}  off by {abs(float(total) - exact):.2e}")
assert len({float(t) for t in sums.values()}) > 1, "different orders, different float32 sums"

# %% [markdown]
# ## A matrix product depends on its batch
#
# A linear layer multiplies a batch of rows, [B, K] @ [K, N]: each output
# element is a sum over K products. BLAS libraries pick a kernel by shape: a
# single row goes to a matrix-*vector* routine (GEMV), several rows to a
# matrix-*matrix* routine (GEMM), and the two split and order the K sum
# differently (blocking, SIMD lanes, fused multiply-adds). So the same row
# gets a slightly different answer alone and inside a batch. Here on the
# GPT-2 124M shape of the attention input projection, 768 -> 2304:

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 768), dtype=np.float32)  # a batch of 32 rows
w = rng.standard_normal((768, 2304), dtype=np.float32)
alone = (x[:1] @ w)[0]  # [1, 768] @ [768, 2304]: GEMV
in_batch = (x @ w)[0]  # [32, 768] @ [768, 2304]: GEMM, same row
differ = np.count_nonzero(alone != in_batch)
ulps = np.abs(alone - in_batch) / np.spacing(np.maximum(np.abs(alone), np.abs(in_batch)))  # units in the last place
print(f"{differ} of {alone.size} outputs differ, by a median of {np.median(ulps[ulps > 0]):.0f} units in the last place")
assert differ > 0, "this machine's BLAS sums a lone row like a batched one"
assert np.allclose(alone, in_batch, rtol=1e-5, atol=1e-3), "the differences are rounding, nothing more"

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(np.minimum(ulps[ulps > 0], 16), bins=np.arange(0.5, 17.5), rwidth=0.9)
ax.set(xlabel="|alone - in batch| in units of the last place (16 = 16 or more)", ylabel="outputs",
       title=f"one row alone vs in a batch of 32: {differ} of {alone.size} differ")  # fmt: skip
show(fig, "05_gemv_vs_gemm.png")

# %% [markdown]
# Why a few units in the last place matter: a language model feeds its
# outputs back into itself. A tiny difference in the logits can, at a near
# tie, pick another token, after which two runs of "the same" request
# diverge completely. Even without a flipped token, a server whose answers
# depend on who else was in the batch cannot be tested exactly.
#
# ## The same thing inside a decode step
#
# `NumpyBackend(config, weights, n_slots, invariant=False)` decodes with
# plain NumPy and BLAS. Decode one request alone and the same request inside
# a batch of 8: its logits differ.

# %%
from flover.loading import resolve
from reference import NumpyBackend

config, weights, tokenizer = resolve(None)


def decode_alone_and_in_batch(backend: NumpyBackend) -> tuple[np.ndarray, np.ndarray]:
    """Row 0's logits decoded alone, and inside a batch of 8 (slots prefilled with 8 prompts)."""
    rng = np.random.default_rng(1)
    for slot in range(8):
        backend.prefill(slot, rng.integers(0, config.vocab_size, size=5 + 3 * slot))
    slots, tokens, positions = np.arange(8), rng.integers(0, config.vocab_size, size=8), 5 + 3 * np.arange(8)
    batch = backend.decode(slots, tokens, positions)  # [8, V]
    solo = backend.decode(slots[:1], tokens[:1], positions[:1])  # [1, V]
    return solo[0], batch[0]


solo, batched = decode_alone_and_in_batch(NumpyBackend(config, weights, 8, invariant=False))
print(f"BLAS decode: {np.count_nonzero(solo != batched)} of {solo.size} logits change when the request shares its step")
assert not np.array_equal(solo, batched)

# %% [markdown]
# ## The fix: a reduction order fixed by the row alone
#
# flover's default path (`invariant=True`), for prefills and decode steps
# alike, runs on the kernels of `reference.invariant`, written as plain Python loops and compiled to
# machine code by Numba. Their rule: every number a
# request gets is computed by a loop whose order depends only on that
# request's own sizes (K, n_embd, its own length), never on the batch.
#
# `matmul_rows(x, w, b)` computes [B, K] @ [K, N] + [N] so that
#
# - each output element adds its K products one after another, in ascending
#   k, in one thread;
# - batch rows are only an outer loop: row r never sees another row;
# - threads split the *output columns* among themselves (each element is
#   still summed by one thread), and vectorisation runs across output
#   columns too, which reorders no sum.
#
# So a row gets the same bits alone, in a batch of 32, in any order, and with
# any number of threads.

# %%
import numba

from reference import invariant

bias = np.zeros(2304, np.float32)
full = invariant.matmul_rows(x, w, bias)  # [32, 768] @ [768, 2304] + [2304] -> [32, 2304]
assert np.array_equal(invariant.matmul_rows(x[:1], w, bias)[0], full[0]), "row 0 alone == row 0 in the batch"
order = np.random.default_rng(2).permutation(32)
assert np.array_equal(invariant.matmul_rows(x[order], w, bias), full[order]), "any batch order"
threads = numba.get_num_threads()
numba.set_num_threads(1)  # and one thread from here on, for steady run times
assert np.array_equal(invariant.matmul_rows(x, w, bias), full), "any number of threads"
print(f"matmul_rows: bitwise the same alone, shuffled, and with 1 or {threads} threads")
assert np.allclose(full, x @ w, rtol=1e-4, atol=1e-3), "and it is the same product, to rounding"

# %% [markdown]
# The other operations of a step that look at more than one number follow
# the same rule. `layer_norm_rows` and `gelu_rows` work row by row with sums
# in ascending order. `decode_attention(q, k_cache, v_cache, slots,
# lengths)` gives each request its own softmax over exactly its own
# `lengths[b]` positions of its own slot: no padding to the longest request,
# whose extra zeros would shift the rounding (and whatever lies past a
# request's length cannot matter, as the noise below shows).
#
# `decode_attention` is the slot layout's name for the general kernel,
# `attention_rows(q, k_cache, v_cache, block_table, lane, lengths)`: row r
# belongs to lane `lane[r]` and reads its positions through that lane's
# block table, whatever the blocks' size and wherever they lie (lesson 5's
# paged blocks). Cut the same keys and values into blocks of 16 positions,
# scatter the blocks over the pool, and every row still gets the same bits.

# %%
rows = rng.standard_normal((6, config.n_embd)).astype(np.float32)
g, beta = rng.standard_normal(config.n_embd).astype(np.float32), np.zeros(config.n_embd, np.float32)
for kernel, args in ((invariant.layer_norm_rows, (g, beta, 1e-5)), (invariant.gelu_rows, ())):
    together = kernel(rows, *args)
    assert all(np.array_equal(kernel(rows[r : r + 1], *args)[0], together[r]) for r in range(6)), kernel.__name__

n_slots, H, n_ctx, D = 4, config.n_head, 64, config.head_dim
k_cache = rng.standard_normal((n_slots, H, n_ctx, D)).astype(np.float32)
v_cache = rng.standard_normal((n_slots, H, n_ctx, D)).astype(np.float32)
q = rng.standard_normal((3, H, D)).astype(np.float32)
slots, lengths = np.array([2, 0, 3]), np.array([10, 37, 5])
out = invariant.decode_attention(q, k_cache, v_cache, slots, lengths)  # [3, H, D]
for r in range(3):
    solo_attn = invariant.decode_attention(q[r : r + 1], k_cache, v_cache, slots[r : r + 1], lengths[r : r + 1])
    assert np.array_equal(solo_attn[0], out[r])
noisy_k, noisy_v = k_cache.copy(), v_cache.copy()
for s, n in zip(slots, lengths):
    noisy_k[s, :, n:] = noisy_v[s, :, n:] = 1e6  # garbage past each request's own length
assert np.array_equal(invariant.decode_attention(q, noisy_k, noisy_v, slots, lengths), out)
print("layer_norm_rows, gelu_rows and decode_attention: every row bitwise the same alone and in a batch")

per_slot = n_ctx // 16  # blocks of 16 positions in a slot
place = rng.permutation(n_slots * per_slot)  # block j of slot s goes to place[s * per_slot + j] in the pool
k_blocks, v_blocks = np.empty((2, n_slots * per_slot, H, 16, D), np.float32)
k_blocks[place] = k_cache.reshape(n_slots, H, per_slot, 16, D).transpose(0, 2, 1, 3, 4).reshape(-1, H, 16, D)
v_blocks[place] = v_cache.reshape(n_slots, H, per_slot, 16, D).transpose(0, 2, 1, 3, 4).reshape(-1, H, 16, D)
block_table = place.reshape(n_slots, per_slot)[slots]  # [3 lanes, 4 blocks]
assert np.array_equal(invariant.attention_rows(q, k_blocks, v_blocks, block_table, np.arange(3), lengths), out)
print("attention_rows over scattered blocks of 16: bitwise the rows of decode_attention over slots")

solo, batched = decode_alone_and_in_batch(NumpyBackend(config, weights, 8))  # invariant=True, the default
assert np.array_equal(solo, batched)
print("invariant decode: a request's logits are bitwise the same alone and in a batch of 8")

# %% [markdown]
# What about the prefill? Alone in its step, a prompt has no other request
# to change its rounding. But the engine does not always run it alone: with
# chunked prefill (lesson 4) a prompt is cut into chunks that share steps
# with other requests' decode rows, and how it is cut depends on the
# schedule (the chunk size, the decodes in the same step, a recomputation
# after a preemption). So the prefill runs on the same kernels: a prompt
# row's result depends only on its token, its position and the keys and
# values before it, and a prompt fed at once, in chunks, or token by token
# gives the same bits (lesson 2 checked it). On a CPU these kernels are also
# faster than BLAS at these shapes.
#
# The price of the invariant kernels is speed: BLAS is tuned to the last
# cycle, the invariant kernels are simple loops. `benchmarks/RESULTS.md`
# measures that cost.
#
# ## The payoff: fused logits equal serial logits, bit for bit
#
# `run_policy(..., keep_logits=True)` keeps, for every request, the logits
# of every token it was given (`result.logits`, one [V] array per token).
# Serve a trace serially and fused under the virtual clock of lesson 4, each
# prompt alone and in chunks of 8 tokens beside the decodes, and compare
# every array of every request exactly. Half the requests sample
# (temperature 0.8, top-k 40) with their own seeds: since each `Sampler`
# draws once per token from its own generator (lesson 2), their tokens are
# schedule-independent too.

# %%
from dataclasses import replace

from flover.clock import VirtualClock
from flover.runner import PolicyConfig, run_policy
from flover.trace import poisson_trace

trace = poisson_trace(300.0, 10, prompt_len=(4, 16), output_len=(4, 24), seed=2, vocab_size=config.vocab_size)
trace = [replace(r, sampling=replace(r.sampling, temperature=0.8, top_k=40)) if r.id % 2 else r for r in trace]


def logits_match(make_backend, fused: PolicyConfig) -> tuple[int, int, bool]:
    """(logit arrays compared, how many are bitwise equal, whether all tokens are equal): fused vs serial."""
    serial = run_policy(PolicyConfig("serial"), make_backend, trace, clock=VirtualClock(), keep_logits=True)
    run = run_policy(fused, make_backend, trace, clock=VirtualClock(), keep_logits=True)
    assert run.metrics["mean_batch"] > 2, "the fused run really batched requests together"
    if fused.prefill == "chunked":
        assert any(0 < step.prefill_rows < step.rows for step in run.stats.steps), "prompt chunks beside decodes"
    truth = {r.id: r for r in serial.results}
    pairs = [(got, want) for r in run.results for got, want in zip(r.logits, truth[r.id].logits, strict=True)]
    same_tokens = all(r.tokens == truth[r.id].tokens for r in run.results)
    return len(pairs), sum(np.array_equal(got, want) for got, want in pairs), same_tokens


ALONE, CHUNKED = PolicyConfig("fused", slots=4), PolicyConfig("fused", slots=4, prefill="chunked", chunk_tokens=8)
for fused in (ALONE, CHUNKED):
    n, equal, same_tokens = logits_match(lambda kv: NumpyBackend(config, weights, kv), fused)
    print(f"invariant kernels, {fused.label}: {equal} of {n} logit arrays bitwise equal, same tokens: {same_tokens}")
    assert equal == n and same_tokens

n_blas, equal_blas, _ = logits_match(lambda kv: NumpyBackend(config, weights, kv, invariant=False), ALONE)
print(f"BLAS, {ALONE.label}: {equal_blas} of {n_blas} logit arrays bitwise equal")
assert equal_blas < n_blas

# %% [markdown]
# ## What we have
#
# - Floating-point sums depend on their order, and BLAS picks the order by
#   the shape of the batch, so batching normally changes a request's logits.
# - flover's kernels, in prefills and decode steps alike, fix each sum's
#   order by the request's own sizes; the batch is only an outer loop, and
#   a request's keys and values may lie in any blocks. A request's logits are then the same bit
#   for bit whoever shares its step, which is why every policy, and the
#   memory shuffle, can be tested for *exact* equality with serial decoding.
# - `tests/test_batch_invariance.py` and `tests/test_fusion_properties.py`
#   check this on many random cases. Lesson 11 shows how to write such checks
#   for a scheduler of your own.
