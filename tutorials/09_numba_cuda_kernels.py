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
# # Lesson 9: Numba CUDA kernels
#
# Lesson 8 made a decode step batch invariant on the CPU: every sum runs in
# an order fixed by one request's own sizes. `numba_kernels/` writes the
# same model for a GPU, as CUDA kernels in Python compiled by Numba, under
# the same rule. This lesson reads those kernels one by one: the three
# matrix products side by side, the choice between them, decode attention
# over the KV slots, the memory shuffle, and finally `NumbaBackend`, a
# backend like lesson 2's whose fused decode step gives every request the
# bits it gets alone.
#
# No GPU? Numba's **CUDA simulator** runs the very same kernel source on the
# CPU. This lesson turns it on where it finds no GPU, and runs unmodified
# on a real one.

# %% [markdown]
# ## A GPU, or the simulator
#
# Numba reads the environment variable `NUMBA_ENABLE_CUDASIM` once, when it
# is imported: set to 1, every `cuda` call goes to the simulator. So the
# decision comes first, before anything imports Numba. We look for a GPU
# without touching CUDA: the NVIDIA driver installs `nvidia-smi`, and
# `nvidia-smi -L` lists the GPUs it sees. If you set the variable yourself
# (`make test` sets it), your choice stands.
#
# The helpers of lesson 1 follow: `OUT`, `show(fig, name)` and
# `show_file(path)` for pictures.

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os
import shutil
import subprocess


def gpu_listed() -> bool:
    """Whether nvidia-smi exists and lists at least one GPU (without loading CUDA in this process)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


if not gpu_listed():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before Numba is imported


# %% [markdown]
# `numba_kernels.device` answers two questions: `simulated()`, whether the
# simulator is on, and `device_name()`, the GPU's name ("simulator" under
# the simulator). `require_cuda()` raises `NoCudaError` when there is
# neither a GPU nor the simulator.
#
# The simulator runs each GPU thread as a Python thread, and Python passes
# the interpreter from one thread to the next every 5 ms by default. At a
# barrier (below) every thread of a block must get its turn, so each barrier
# costs milliseconds. Under the simulator we switch every 0.1 ms instead, as
# flover's tests do (`numba_kernels.simulator.quick_switching`); on a GPU
# nothing changes. (Importing `numba_kernels` under the simulator also
# closes a race in it; `numba_kernels/simulator.py` tells the story.)
# %%
import sys

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py
from numba import cuda

from numba_kernels.device import device_name, require_cuda, simulated

require_cuda()
RUNS_ON = "the CUDA simulator (on the CPU)" if simulated() else f"the GPU {device_name()}"
print("kernels run on", RUNS_ON)
if simulated():
    sys.setswitchinterval(1e-4)

# %% [markdown]
# ## Threads, blocks and grids
#
# A CUDA **kernel** is a function that many **threads** run at once, each on
# its own piece of the data. Threads come in **blocks** of up to 1024; the
# threads of one block run on the same multiprocessor, can share a small
# fast **shared memory**, and can wait for each other at a **barrier**
# (`cuda.syncthreads()`). The blocks of one launch form the **grid**; blocks
# run in any order and cannot wait for each other. A thread knows where it
# stands from `cuda.threadIdx` (its place in its block), `cuda.blockIdx`
# (its block's place in the grid) and `cuda.blockDim` (the block's size),
# each with `.x`, `.y`, `.z` for grids and blocks of up to three dimensions.
# In Numba, `@cuda.jit` makes a kernel, `kernel[blocks, threads](args)`
# launches it, `cuda.to_device(a)` copies a NumPy array to the GPU and
# `.copy_to_host()` copies it back.
#
# The smallest example: 20 elements, blocks of 8 threads, so 3 blocks (24
# threads). Each thread computes its global index and records who it is. The
# last 4 threads fall past the end and must do nothing: every kernel below
# has such a guard.


# %%
@cuda.jit
def whoami(block_of, thread_of):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x  # this thread's global index
    if i < block_of.shape[0]:
        block_of[i] = cuda.blockIdx.x
        thread_of[i] = cuda.threadIdx.x


n, threads = 20, 8
blocks = (n + threads - 1) // threads  # ceil(n / threads)
block_of, thread_of = cuda.to_device(np.full(n, -1, np.int32)), cuda.to_device(np.full(n, -1, np.int32))
whoami[blocks, threads](block_of, thread_of)
block_of, thread_of = block_of.copy_to_host(), thread_of.copy_to_host()
print("block: ", block_of.tolist())
print("thread:", thread_of.tolist())
assert np.array_equal(block_of * threads + thread_of, np.arange(n)), "every element written once, by its own thread"

# %% [markdown]
# ## Three GEMMs, side by side
#
# Every linear layer is a **GEMM** (general matrix multiply):
# out[M, N] = x[M, K] @ w[K, N] + b[N], with M rows (prompt tokens in a
# prefill, requests in a decode step). `numba_kernels/gemm.py` holds three
# versions; a `Variant(kernel, params)` names one with its launch
# parameters, and `launch(variant, x, w, b, out)` runs it on device arrays.
#
# 1. **naive**, params `(threads,)`: one thread per output element. The grid
#    is (ceil(N / threads), M): `blockIdx.y` is the row, and the threads of a
#    block take consecutive columns. Each thread walks all of K, reading x and
#    w from the GPU's main memory.
# 2. **tiled**, params `(BM, BN, BK, TM, TN)`: a block computes a BM x BN
#    tile of the output. It copies a BM x BK slab of x and a BK x BN slab of
#    w into shared memory, waits at a barrier, multiplies, and moves on to
#    the next BK. Each of its (BM/TM) x (BN/TN) threads keeps a TM x TN patch
#    of outputs in registers (**register blocking**), so each number read
#    from shared memory feeds several multiply-adds. For prefills and big
#    batches.
# 3. **gemv**, params `(threads, ROWS)` (matrix-vector, for few rows): each
#    thread owns one output column for up to ROWS rows. It walks K reading its
#    column of w once for all its rows; the rows of x sit in shared memory.
#    In a decode step the weights are most of the bytes, so reading them once
#    per ROWS rows is what counts.
#
# Who computes what, for M = 12 rows and N = 40 columns: colour is the block
# (`owner` redoes each kernel's index arithmetic on the host). In the tiled
# kernel the dots mark the outputs of one thread, thread (0, 0) of the first
# block: its TM x TN patch is spread across the tile with a stride, so that
# neighbouring threads read neighbouring shared-memory words.

# %%
from numba_kernels.gemm import Variant, launch

NAIVE, TILED, GEMV = Variant("naive", (32,)), Variant("tiled", (8, 16, 8, 2, 4)), Variant("gemv", (32, 4))


def owner(variant: Variant, m: int, n: int) -> np.ndarray:
    """[m, n]: the number of the block that computes each output element (grid x fastest)."""
    rows, cols = np.indices((m, n))
    if variant.kernel == "naive":
        per_block_rows, per_block_cols = 1, variant.params[0]
    elif variant.kernel == "tiled":
        per_block_rows, per_block_cols = variant.params[0], variant.params[1]
    else:
        per_block_rows, per_block_cols = variant.params[1], variant.params[0]
    grid_x = -(-n // per_block_cols)
    return (rows // per_block_rows) * grid_x + cols // per_block_cols


M, N = 12, 40
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
for ax, variant in zip(axes, (NAIVE, TILED, GEMV)):
    blocks_of = owner(variant, M, N)
    ax.imshow(blocks_of % 10, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set(title=f"{variant}: {blocks_of.max() + 1} blocks", xlabel="column n", ylabel="row m")
bm, bn, _, tm, tn = TILED.params
patch_rows, patch_cols = np.arange(tm) * (bm // tm), np.arange(tn) * (bn // tn)  # thread (0, 0)'s outputs
axes[1].scatter(*np.meshgrid(patch_cols, patch_rows), color="black", s=12)
show(fig, "06_gemm_blocks.png")
assert owner(NAIVE, M, N).max() + 1 == 2 * M and owner(GEMV, M, N).max() + 1 == 2 * 3

# %% [markdown]
# Now run them, with two more tile shapes (the default 32 x 32 tile, and one
# thread per row in the GEMV), on M = 12, K = 48, N = 40: shapes that leave
# partial tiles at the edges. Each output array starts full of NaN, so an
# element a kernel forgot to write would show. Each result is checked
# against NumPy in float64, and all five against each other, **bitwise**.

# %%
rng = np.random.default_rng(0)
K = 48
x = rng.standard_normal((M, K), dtype=np.float32)
w = rng.standard_normal((K, N), dtype=np.float32)
b = rng.standard_normal(N, dtype=np.float32)


def gemm(variant: Variant, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [M, K] @ w [K, N] + b [N] with one variant, on the device; -> [M, N] on the host."""
    out = cuda.to_device(np.full((x.shape[0], w.shape[1]), np.nan, np.float32))  # poisoned
    launch(variant, cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    return out.copy_to_host()


exact = x.astype(np.float64) @ w + b  # [M, N]
results = {str(v): gemm(v, x, w, b) for v in (NAIVE, TILED, Variant("tiled", (32, 32, 16, 4, 4)), GEMV,
                                              Variant("gemv", (64, 1)))}  # fmt: skip
for name, got in results.items():
    print(f"{name:22s} max |error| vs float64 {np.abs(got - exact).max():.1e}, "
          f"bitwise equal to naive: {np.array_equal(got, results[str(NAIVE)])}")  # fmt: skip
    assert not np.isnan(got).any(), f"{name} left an output unwritten"
    assert np.allclose(got, exact, rtol=1e-5, atol=1e-5), name
    assert np.array_equal(got, results[str(NAIVE)]), f"{name} differs from naive"
blas = x @ w + b  # NumPy in float32: the same product, summed in BLAS's order
print(f"NumPy float32 (BLAS): {np.count_nonzero(blas != results[str(NAIVE)])} of {blas.size} outputs differ from the kernels")

# %% [markdown]
# Why bitwise equal, when lesson 8 showed that summing in another order
# changes the last bits? Because the three versions differ in *who* computes
# an element and *where the inputs wait* (main memory, shared memory,
# registers), never in the order of the sum. Every output element is summed
# by one thread, over k ascending, with one fused multiply-add per k
# (`cuda.fma`), and the bias comes last. No version splits K between threads
# or blocks. (The simulator's `cuda.fma` rounds twice, a GPU's once; every
# version uses it, so they agree on either.)
#
# The price: a launch has only N x ceil(M / ROWS) threads with work, each
# walking all of K. A big GPU with a narrow layer at batch 1 has too few
# threads to keep busy; splitting K would fix that and break the rule.
#
# ## Dispatch: which GEMM a shape gets
#
# Since every variant gives the same bits, choosing one is about speed only.
# `numba_kernels.dispatch.Dispatch(table)` picks one per shape (M, N, K) and
# `dispatch.gemm(x, w, b, out)` runs it. Without a table entry for the shape,
# `default_variant(m, n, k)` decides:
#
# - M <= 8: `staged` (`gemm_staged.py`), a GEMV for decode steps whose
#   block first loads a strip of weight columns into shared memory with all
#   its threads, then has one thread per output sum it;
# - 8 < M <= 64: `tiled` with 32 x 32 tiles, BK = 16, 4 x 4 outputs per
#   thread (big batches);
# - M > 64: `prefetch` (`gemm_prefetch.py`), padded tiles, 8 x 8 outputs a
#   thread and the next tile prefetched into registers (prefills).
#
# Here for GPT-2 124M's attention input projection, K = 768 -> N = 2304:

# %%
from numba_kernels.dispatch import Dispatch, default_variant, load_table

for m in (1, 2, 3, 8, 9, 64, 65):
    print(f"M = {m:2d}: {default_variant(m, 2304, 768)}")
assert [default_variant(m, 2304, 768).kernel for m in (3, 9, 65)] == ["staged", "tiled", "prefetch"]

# %% [markdown]
# A **tuning table** overrides the rule. `python -m numba_kernels.tune`, run
# on a GPU, times every variant on each GPT-2 shape and writes the fastest
# into `numba_kernels/tuning.json`, keyed by the GPU's name ("1x2304x768"
# means M x N x K). `load_table()` reads this device's entries, and
# `Dispatch()` uses them. For a shape (M, N, K) it takes the entry for
# exactly that shape; else, for the same N and K, the entry with the largest
# tuned M not above M (a batch of 6 between tuned batches 4 and 16 takes 4's
# choice); else the default rule. Here is a table made by hand, so that the
# lesson shows the same choices on every machine:

# %%
print(f"tuned entries for {device_name()!r} in tuning.json: {len(load_table())}")
table = {"4x40x48": TILED, "16x40x48": NAIVE}
dispatch = Dispatch(table)
for m in (1, 2, 4, 6, 12, 16, 20):
    print(f"M = {m:2d}, N = 40, K = 48: {dispatch.choose(m, 40, 48)}")
assert dispatch.choose(4, 40, 48) == TILED, "an exact entry"
assert dispatch.choose(6, 40, 48) == TILED and dispatch.choose(20, 40, 48) == NAIVE, "the largest tuned M below"
assert dispatch.choose(2, 40, 48) == default_variant(2, 40, 48), "nothing tuned at or below M = 2"
assert dispatch.choose(4, 64, 48) == default_variant(4, 64, 48), "another (N, K): the rule"

# %% [markdown]
# This is batch invariance once more: a request's row goes through whatever
# variant the batch size selects (GEMV alone, tiles in a batch of 12), and
# gets the same bits.

# %%
for m in (1, 2, 6, 12):
    got = dispatch.gemm(cuda.to_device(x[:m]), cuda.to_device(w), cuda.to_device(b),
                        cuda.device_array((m, N), np.float32)).copy_to_host()  # fmt: skip
    assert np.array_equal(got, results[str(NAIVE)][:m]), f"the first {m} rows changed with M"
print("rows 0..m-1 bitwise the same at M = 1, 2, 6, 12, whichever variant ran")

# %% [markdown]
# ## Decode attention over the KV slots
#
# `numba_kernels.attention.attention(qkv, k_cache, v_cache, slots, lengths,
# out)` is one layer's attention for a decode step of B requests. The cache
# has lesson 2's slot layout, one layer of it: k_cache and v_cache are
# [n_slots, H, n_ctx, D]. The queries come straight from the `c_attn`
# output, qkv [B, 3C] (q, k and v side by side, as in lesson 1), and the
# result is written with heads merged, out [B, C]. Request r reads slot
# `slots[r]`, positions 0 .. `lengths[r]` - 1: its own length, not the
# longest in the batch.
#
# The grid is (B, H): one block per (request, head), so no two requests
# ever share a sum. The block scores its positions (thread t takes positions
# t, t + T, ...; each dot product over d ascending), finds the maximum and
# the sum of the exponentials with block reductions in thread order
# (`numba_kernels/reduce.py`), then weights V. Its size T depends on n_ctx
# only, never on the batch. The scores of one query live in shared memory,
# n_ctx floats, given at launch.
#
# To show that a request reads only its own length, poison every position
# past it with NaN: any NaN read would spread to the output.

# %%
from numba_kernels.attention import attention
from reference import invariant

n_slots, H, n_ctx, D = 4, 2, 24, 8
C = H * D
k_cache = rng.standard_normal((n_slots, H, n_ctx, D), dtype=np.float32)
v_cache = rng.standard_normal((n_slots, H, n_ctx, D), dtype=np.float32)
slots, lengths = np.array([2, 0, 3]), np.array([5, 17, 9])
for s, length in zip(slots, lengths):
    k_cache[s, :, length:] = v_cache[s, :, length:] = np.nan  # past this request's length
k_cache[1] = v_cache[1] = np.nan  # a slot no request uses
qkv = rng.standard_normal((len(slots), 3 * C), dtype=np.float32)  # [B, 3C]


def decode_attention(qkv: np.ndarray, slots: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The attention kernel on the device; -> [B, C] on the host."""
    out = cuda.to_device(np.full((len(slots), C), np.nan, np.float32))
    attention(cuda.to_device(qkv), cuda.to_device(k_cache), cuda.to_device(v_cache),
              cuda.to_device(slots.astype(np.int32)), cuda.to_device(lengths.astype(np.int32)), out)  # fmt: skip
    return out.copy_to_host()


out = decode_attention(qkv, slots, lengths)  # [3, C]
q = np.ascontiguousarray(qkv[:, :C].reshape(len(slots), H, D))  # [B, H, D]
cpu = invariant.decode_attention(q, k_cache, v_cache, slots, lengths).reshape(len(slots), C)  # lesson 8's kernel
print(f"NaN in the output: {np.isnan(out).any()}; max |GPU - CPU| {np.abs(out - cpu).max():.1e}")
assert not np.isnan(out).any(), "no request read past its own length"
assert np.allclose(out, cpu, rtol=1e-5, atol=1e-5)
for r in range(len(slots)):
    alone = decode_attention(qkv[r : r + 1], slots[r : r + 1], lengths[r : r + 1])
    assert np.array_equal(alone[0], out[r]), f"request {r} changed in a batch"
print("each request's attention is bitwise the same alone and in the batch")

# %% [markdown]
# The same file holds `store_kv`, which writes each new token's k and v into
# its slot at its position and records the slot's length, and
# `prefill_attention`: query i of a prompt is a decode query over length
# i + 1, so the causal mask of lesson 1 comes for free, and a prompt
# prefilled at once gives bitwise the rows it would give fed one token at a
# time.
#
# ## The memory shuffle in one launch
#
# Lesson 5's shuffle plan moves requests into holes. On the device,
# `numba_kernels.shuffle.move_slots(k, v, slot_lengths, src, dst, lengths)`
# carries it out for the whole cache (all layers: k and v
# [n_layer, n_slots, H, n_ctx, D]): pair p copies the first `lengths[p]`
# positions of slot `src[p]` into slot `dst[p]`, in every layer and head,
# and moves the slot's cached length in `slot_lengths` [n_slots] with it.
# One launch: the grid is (chunk, layer x head, pair), each block copying a
# chunk of one contiguous run of positions x D floats, consecutive threads
# on consecutive floats. The destinations are holes, never sources, so the
# blocks need no order among themselves.
#
# We take lesson 5's slot map, give each request a length, and compare with
# the NumPy copy, the `move` of lesson 2's `KVSlots`.

# %%
from flover.engine.shuffle import shuffle_plan
from numba_kernels.shuffle import move_slots
from reference import GPTConfig, KVSlots

active = [True, False, False, True, True, False, True, True, False, False, True, False]
plan = shuffle_plan(active)  # [(0, 2), (10, 5)], lesson 5
src, dst = np.array([s for s, _ in plan]), np.array([d for _, d in plan])
cached = np.where(active, rng.integers(1, 17, len(active)), 0)  # positions each slot holds
config = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_ctx=16)
host = KVSlots(config, n_slots=len(active))  # k, v [2, 12, 2, 16, 8]
host.k[:] = rng.standard_normal(host.k.shape, dtype=np.float32)
host.v[:] = rng.standard_normal(host.v.shape, dtype=np.float32)

k, v, slot_lengths = cuda.to_device(host.k), cuda.to_device(host.v), cuda.to_device(cached.astype(np.int32))
before = host.k.copy()
move_slots(k, v, slot_lengths, src, dst, cached[src])
host.move(src, dst, cached[src])
print(f"plan {plan}, lengths {cached[src].tolist()}: cache bitwise equal to KVSlots.move:",
      np.array_equal(k.copy_to_host(), host.k) and np.array_equal(v.copy_to_host(), host.v))  # fmt: skip
assert np.array_equal(k.copy_to_host(), host.k) and np.array_equal(v.copy_to_host(), host.v)
assert np.array_equal(slot_lengths.copy_to_host()[dst], cached[src]), "each slot's length moved with it"
for s, d in plan:
    assert np.array_equal(host.k[:, d, :, cached[s] :], before[:, d, :, cached[s] :]), "nothing past the length"

# %% [markdown]
# ## NumbaBackend: the whole model on the device
#
# `numba_kernels.NumbaBackend(config, weights, n_slots)` puts it together. It
# implements lesson 2's `Backend` protocol, `step(lanes)` and `move`, and
# gets `prefill` and `decode` from `LaneBackend` as lanes, so the engine of
# lessons 4 and 5 runs on it (`flover bench --backend numba`). It uploads the
# weights once and keeps the KV memory on the device, in Flover's slots (one
# block of n_ctx positions per request; it refuses paged blocks). A step, any
# mix of prompt chunks and decode tokens, runs from the embedding to the
# logits with the kernels above (plus layer norm, GELU and the residual add
# in `numba_kernels/elementwise.py`, each one row at a time), its GEMMs
# chosen by a `Dispatch`, and only the logits of each lane's last token come
# back.
#
# The simulator is slow (a Python thread per GPU thread), so we build a
# small model by hand: a `GPTConfig` (lesson 1) of 1 layer, 2 heads,
# n_embd 32, 64 tokens and a context of 32, with random weights from
# `reference.init_weights(config, seed, std)`, GPT-2's initialisation with
# a chosen standard deviation. A larger `std` than GPT-2's 0.02 gives sharper
# predictions, so different requests get visibly different tokens.

# %%
from numba_kernels import NumbaBackend
from reference import NumpyBackend, generate, init_weights

config = GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_ctx=32)
weights = init_weights(config, seed=1, std=0.3)
gpu = NumbaBackend(config, weights, n_slots=3)
cpu = NumpyBackend(config, weights, n_slots=3)
prompts = {0: [5, 17, 63, 0, 42], 1: [9, 9, 2], 2: [33, 1, 60, 5, 8, 21, 7]}
prefilled = {}  # slot -> the logits of its prompt's last position, on the device
for slot, prompt in prompts.items():
    prefilled[slot], on_cpu = gpu.prefill(slot, np.array(prompt)), cpu.prefill(slot, np.array(prompt))
    assert np.allclose(prefilled[slot], on_cpu, rtol=1e-4, atol=1e-4), f"slot {slot}: the same model, to rounding"

# %% [markdown]
# One fused decode step over all three slots, in a mixed order, and then each
# request alone at the same slot and position. Decoding a request again
# rewrites the same k and v at the same position, so the cache is as it was.
# Every row of the fused step is bitwise its solo decode; next to the NumPy
# backend, the logits agree to rounding and pick the same tokens.

# %%
slots = np.array([2, 0, 1])
tokens = np.array([11, 3, 40])
positions = np.array([len(prompts[s]) for s in slots])
fused = gpu.decode(slots, tokens, positions)  # [3, V]
for r in range(len(slots)):
    solo = gpu.decode(slots[r : r + 1], tokens[r : r + 1], positions[r : r + 1])  # [1, V]
    assert np.array_equal(solo[0], fused[r]), f"row {r} (slot {slots[r]}) changed in the fused step"
numpy_logits = cpu.decode(slots, tokens, positions)
print(f"fused rows == solo decodes, bitwise; max |Numba - NumPy| {np.abs(fused - numpy_logits).max():.1e}")
assert np.allclose(fused, numpy_logits, rtol=1e-4, atol=1e-4)
assert np.array_equal(fused.argmax(axis=-1), numpy_logits.argmax(axis=-1))

on_gpu = list(generate(gpu, prompts[0], 6))
assert on_gpu == list(generate(cpu, prompts[0], 6)), "greedy tokens equal the NumPy backend's"
print(f"greedy tokens after {prompts[0]}: {on_gpu}, on {RUNS_ON}")

# %% [markdown]
# And lesson 2's other promise, on the device: a prompt prefilled in one
# lane (slot 1's, above) gives bitwise the last logits of the same prompt
# fed one token per step, since each row is computed from its own token,
# position and cached keys and values alone.

# %%
from reference import Lane

for i, token in enumerate(prompts[1]):
    one_by_one = gpu.step([Lane.of([0], [token], i)])[0]  # 3 steps of 1 lane of 1 token, into slot 0
assert np.array_equal(prefilled[1], one_by_one)
print("a prompt at once == one token at a time, bitwise, on", RUNS_ON)

# %% [markdown]
# ## What we have
#
# - A kernel runs as a grid of blocks of threads; every thread finds its
#   piece of the data from its block and thread indices.
# - The naive, tiled and GEMV GEMMs move data differently but sum every
#   output element in one thread, over k ascending. So they are bitwise
#   equal, dispatch (the default rule, or a tuning table) decides speed
#   only, and a row gets the same bits whatever its batch.
# - Decode attention gives each (request, head) its own block and reads only
#   the request's own length; the shuffle moves slots in one launch.
# - `NumbaBackend` is a backend like the others: a fused step's rows equal
#   solo decodes bit for bit, and a prompt at once equals it fed token by
#   token, on a GPU as under the simulator.
# - `tests/test_numba_*.py` check all of this on random shapes, and
#   `numba_kernels/README.md` says how to tune and benchmark on a GPU.
#
# Next, lesson 10 splits one model over several processes: tensor
# parallelism over MPI.
