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
# results, then builds a matrix product whose rows do not depend on their
# batch, checks it bit for bit against flover's own, times it, and ends with
# fused decoding equal to serial decoding exactly.

# %% [markdown]
# The helpers of lesson 1 (`show` for pictures). This lesson times things,
# so NumPy's matrix library runs on one thread (below). Numba, the compiler
# we meet later, keeps its default number of threads at first: we show that
# the count changes no result, then time on one thread too.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads

import inspect

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
# ordinary numbers. Summing many numbers, every order gives its own answer:
# one after another (what `np.add.accumulate` does), NumPy's pairwise
# `np.sum`, the same numbers backwards, or sorted.

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
# ## What `x @ w` runs: BLAS
#
# A linear layer multiplies a batch of rows, [B, K] @ [K, N]: each output
# element is a sum of K products. NumPy does not compute `@` itself. It calls
# **BLAS**, the *Basic Linear Algebra Subprograms*: a standard list of
# routines, implemented by libraries tuned for each processor (OpenBLAS here,
# Intel's MKL, Apple's Accelerate). Two of its routines matter here:
# **GEMM** (general matrix-matrix multiply) for a batch of rows and **GEMV**
# (matrix-vector) for a single row. A fast GEMM uses three tricks:
#
# - **Blocking.** Main memory is slow next to the arithmetic (lesson 3). A
#   core keeps recently used data in its **caches**, small fast memories, and
#   its **registers**, the few dozen values it computes on directly. GEMM cuts
#   the matrices into blocks that fit there and multiplies block by block, so
#   each number read from memory serves many multiply-adds. The sum over K is
#   then done block by block: partial sums over one block of k, added
#   together later.
# - **Vectorisation.** A modern core has **SIMD** instructions (*single
#   instruction, multiple data*): one instruction adds or multiplies 8
#   float32 at once (16 on a CPU with AVX-512), each in its own **lane** of a
#   wide register. A sum can use the lanes in two ways: side by side for 8
#   *different* outputs, which reorders nothing, or to split *one* sum into 8
#   partial sums (lane i takes terms i, i + 8, ...) added at the end, which
#   reorders it.
# - **Fused multiply-add** (FMA): a * b + c in one instruction, rounded once
#   instead of twice.
#
# Each routine picks its blocks, lanes and FMAs for its own shapes, so GEMV
# and GEMM (and GEMM at different batch sizes) may add the same K products in
# different orders. Here are two of those orders, on the 768 products of one
# row of x with each of 2304 columns of w (GPT-2 124M's attention input
# projection, 768 -> 2304): one after another, and split over 8 lanes.

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 768), dtype=np.float32)  # a batch of 32 rows
w = rng.standard_normal((768, 2304), dtype=np.float32)
products = x[0][:, None] * w  # [K, N]: the terms of row 0's 2304 sums
in_order = np.add.accumulate(products, axis=0)[-1]  # [N]: k = 0, 1, 2, ... for each column
lanes = np.add.accumulate(products.reshape(96, 8, 2304), axis=0)[-1]  # [8, N]: lane i sums k = i, i + 8, ...
in_lanes = np.add.accumulate(lanes, axis=0)[-1]  # [N]: then the 8 lanes are added
print(f"one by one vs 8 lanes: {np.count_nonzero(in_order != in_lanes)} of 2304 sums differ")
assert np.count_nonzero(in_order != in_lanes) > 0

# %% [markdown]
# ## A matrix product depends on its batch
#
# So look for a batch where `@` gives row 0 other bits than it gives row 0
# alone: try batches of 2 to 32 rows.

# %%
alone = (x[:1] @ w)[0]  # [1, 768] @ [768, 2304]: GEMV
for rows in (2, 4, 8, 32):
    in_batch = (x[:rows] @ w)[0]  # [rows, 768] @ [768, 2304]: GEMM, same row
    print(f"row 0 alone vs in a batch of {rows:2d}: {np.count_nonzero(alone != in_batch)} of {alone.size} outputs differ")
differ = np.count_nonzero(alone != in_batch)
ulps = np.abs(alone - in_batch) / np.spacing(np.maximum(np.abs(alone), np.abs(in_batch)))  # units in the last place
print(f"in the batch of 32, by a median of {np.median(ulps[ulps > 0]):.0f} units in the last place")
assert differ > 0, "this machine's BLAS sums a lone row like a batched one"
assert np.allclose(alone, in_batch, rtol=1e-5, atol=1e-3), "the differences are rounding, nothing more"

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(np.minimum(ulps[ulps > 0], 16), bins=np.arange(0.5, 17.5), rwidth=0.9)
ax.set(xlabel="|alone - in batch| in units of the last place (16 = 16 or more)", ylabel="outputs",
       title=f"one row alone vs in a batch of 32: {differ} of {alone.size} differ")  # fmt: skip
show(fig, "08_gemv_vs_gemm.png")

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
# ## The fix: each sum's order fixed by its own row
#
# The rule: every output element is summed in an order that depends only on
# its own row's sizes (here K), never on how many rows share the call. The
# simplest way is to write the loops ourselves: for each row, for each k in
# ascending order, add x[r, k] * w[k, n] into output n. Lanes may still work
# side by side on *different* columns n: that reorders no sum.
#
# Python's interpreter would run these loops one step at a time, about 57
# million multiply-adds for 32 rows. **Numba** compiles them instead. `@numba.njit` on a
# function of loops over NumPy arrays turns it into machine code, through
# the LLVM compiler, the first time it is called with given argument types
# (*just in time*: "jit"; "n" for *no Python*: the whole function must
# compile, with no interpreter left inside). Later calls with the same types
# run the machine code directly. We call the compiled result a **kernel**,
# as in lesson 3: one operation over whole arrays.
#
# Each multiply-add should be one **FMA**, rounded once, the way flover's
# kernels do it; `reference.invariant.fma` is a small Numba extension that
# asks LLVM for exactly that instruction:

# %%
import numba

from reference import invariant

print(inspect.getsource(invariant.fma))


@numba.njit
def matmul_by_rows(x, w, b):
    """[B, K] @ [K, N] + [N] -> [B, N]: each output element summed over k ascending, one FMA per k."""
    n_rows, k_dim = x.shape
    out = np.empty((n_rows, w.shape[1]), np.float32)
    for r in range(n_rows):  # a row never meets another row
        acc = out[r]  # [N]: one running sum per output column
        acc[:] = 0.0
        for k in range(k_dim):  # ascending k, whatever the batch
            xk, wk = x[r, k], w[k]  # a number, and row k of w [N]
            for n in range(w.shape[1]):  # N separate sums side by side: SIMD lanes across columns
                acc[n] = invariant.fma(xk, wk[n], acc[n])
        for n in range(w.shape[1]):
            acc[n] += b[n]  # the bias last
    return out


# %% [markdown]
# The first call compiles, the second only runs:

# %%
import time

bias = rng.standard_normal(2304, dtype=np.float32)
start = time.perf_counter()
mine = matmul_by_rows(x, w, bias)  # [32, 768] @ [768, 2304] + [2304] -> [32, 2304]
first_s = time.perf_counter() - start
start = time.perf_counter()
matmul_by_rows(x, w, bias)
second_s = time.perf_counter() - start
print(f"first call {first_s * 1e3:.0f} ms (compiling), second {second_s * 1e3:.1f} ms")
assert first_s > 3 * second_s, "the first call compiles"

# %% [markdown]
# Now the property. Row 0 alone, and every row of the batch in a shuffled
# batch, get the same bits as in the batch of 32: where `@` failed, our
# kernel holds. And it is the same product as `@`, to rounding.

# %%
assert np.array_equal(matmul_by_rows(x[:1], w, bias)[0], mine[0]), "row 0 alone == row 0 in the batch"
order = np.random.default_rng(2).permutation(32)
assert np.array_equal(matmul_by_rows(x[order], w, bias), mine[order]), "any batch order"
assert np.allclose(mine, x @ w + bias, rtol=1e-4, atol=1e-3), "the same product, to rounding"
print("matmul_by_rows: every row bitwise the same alone, in a batch of 32, and shuffled")

# %% [markdown]
# ## flover's kernel: `invariant.matmul_rows`
#
# flover's default path (`invariant=True`), for prefills and decode steps
# alike, runs on the kernels of `reference.invariant`. Its matrix product,
# `matmul_rows(x, w, b)`, keeps our rule and adds speed: the weight is
# *packed* once into tiles of 64 columns (`pack_weight`), each tile of
# columns can go to another **thread** (a line of execution; each core of
# the CPU runs one at a time, so two threads can use two cores), and a
# block of `TILE_ROWS` rows shares each loaded row of a tile (blocking
# across rows, which reorders no sum). The heart of it:

# %%
print(inspect.getsource(invariant.matmul_tiles))
print(f"TILE_ROWS = {invariant.TILE_ROWS}, TILE_N = {invariant.TILE_N} on this CPU")

# %% [markdown]
# Each element still starts at 0, adds its K products with one FMA each in
# ascending k, then the bias: the same sequence as ours. So the two kernels
# must agree bit for bit, with a plain or a packed weight, alone or in a
# batch. And since threads only split columns, the number of threads changes
# nothing either (Numba runs `prange` loops on up to `NUMBA_NUM_THREADS`
# threads).

# %%
packed = invariant.pack_weight(w)
for rows in (1, 32):
    assert np.array_equal(invariant.matmul_rows(x[:rows], w, bias), mine[:rows]), f"plain weight, {rows} rows"
    assert np.array_equal(invariant.matmul_rows(x[:rows], packed, bias), mine[:rows]), f"packed weight, {rows} rows"
print("matmul_by_rows == invariant.matmul_rows, bit for bit, with a plain and a packed weight")

most = numba.config.NUMBA_NUM_THREADS
if most > 1:
    numba.set_num_threads(most)
    with_most = invariant.matmul_rows(x, packed, bias)
    numba.set_num_threads(1)
    assert np.array_equal(invariant.matmul_rows(x, packed, bias), with_most), "threads split columns, not sums"
    print(f"matmul_rows: bitwise the same on 1 and on {most} threads")
else:
    print("Numba has one thread here (NUMBA_NUM_THREADS=1): no other thread count to compare")
numba.set_num_threads(1)  # one thread from here on, for steady timings

# %% [markdown]
# ## What invariance costs: timed
#
# Time the three on one thread, at batch 1 (a decode step of one request)
# and batch 32: our loop, flover's kernel with its packed weight, and `@`
# (BLAS; `+ bias` included for all). Each runs several times in a row (so
# the weight it reads sits in the cache, as it would for any of them), in
# three rounds that take turns, so that a busy spell of the machine cannot
# favour one; each time is the best of all runs, since on a busy machine a
# run can only be slowed down, never sped up.

# %%
def best_ms(calls: dict, repeats: int, rounds: int = 3) -> dict:
    """{name: the fastest run of call(), in milliseconds}: ``repeats`` runs of each call in a row, ``rounds`` times."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def products(xr: np.ndarray) -> dict:
    """The three ways to compute xr @ w + bias."""
    return {
        "matmul_by_rows (ours)": lambda: matmul_by_rows(xr, w, bias),
        "invariant.matmul_rows": lambda: invariant.matmul_rows(xr, packed, bias),
        "x @ w + b (BLAS)": lambda: xr @ w + bias,
    }


timed = {}
for rows in (1, 32):
    timed[rows] = best_ms(products(x[:rows]), repeats=10 if rows == 1 else 3)
    for name, ms in timed[rows].items():
        print(f"batch {rows:2d}  {name:22s} {ms:6.2f} ms  ({1e3 * ms / rows:5.0f} us a row)")
ours, flover, blas = (np.array([timed[r][k] for r in (1, 32)]) for k in timed[1])
print(f"ours takes {ours[0] / blas[0]:.1f}x the time of BLAS at batch 1, {ours[1] / blas[1]:.1f}x at batch 32")
assert ours[0] < 3 * blas[0], "at batch 1 all three read the weight once: about the same time"
assert ours[1] > 1.5 * blas[1], "at batch 32 BLAS's blocking pays"
assert flover[1] < 1.5 * ours[1], "flover's kernel is no slower than ours"

# %% [markdown]
# What the numbers say. At batch 1 the three take about the same time: each
# reads the whole weight (7 MB) once and does one multiply-add per number
# read, so reading memory, not arithmetic, sets the pace (lesson 3's
# memory-bound side). At batch 32 the same weight serves 32 rows, and BLAS,
# blocked so that every loaded number feeds many rows, pulls ahead: that is
# the price of invariance on this CPU, paid at large batches. Our loop reads
# the weight again for every row; flover's kernel shares each load among
# `TILE_ROWS` rows only. Blocking over rows never reorders a sum, so an
# invariant kernel could close more of the gap; what it may never do is
# split one element's K sum in a way that depends on the batch.
#
# ## The other operations
#
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
# block table, whatever the blocks' size and wherever they lie (lesson 6's
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
# chunked prefill (lesson 7) a prompt is cut into chunks that share steps
# with other requests' decode rows, and how it is cut depends on the
# schedule (the chunk size, the decodes in the same step, a recomputation
# after a preemption). So the prefill runs on the same kernels: a prompt
# row's result depends only on its token, its position and the keys and
# values before it, and a prompt fed at once, in chunks, or token by token
# gives the same bits (lesson 2 checked it).
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
#   the shape of the batch (GEMV for one row, GEMM blocked and vectorised
#   for many), so batching normally changes a request's logits.
# - A kernel that sums each element in ascending k, one FMA per term, in
#   one loop that never looks at the other rows, gives every row the same
#   bits alone and in any batch. Ours, a dozen lines compiled by Numba,
#   equals flover's `invariant.matmul_rows` bit for bit.
# - Measured on this CPU: as fast as BLAS at batch 1, slower at batch 32,
#   where BLAS's blocking reuses each weight across rows.
# - flover's kernels, in prefills and decode steps alike, fix each sum's
#   order by the request's own sizes; the batch is only an outer loop, and
#   a request's keys and values may lie in any blocks. A request's logits
#   are then the same bit for bit whoever shares its step, which is why
#   every policy, and the memory shuffle, can be tested for *exact*
#   equality with serial decoding.
# - `tests/test_batch_invariance.py` and `tests/test_fusion_properties.py`
#   check this on many random cases. Lesson 9 writes the same kernels for a
#   GPU; lesson 11 shows how to write such checks for a scheduler of your
#   own.
