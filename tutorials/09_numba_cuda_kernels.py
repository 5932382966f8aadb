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
# Lesson 8 made a step batch invariant on the CPU: every sum runs in an
# order fixed by one request's own sizes. `numba_kernels/` writes the same
# model for a GPU (lesson 3), as CUDA kernels in Python compiled by Numba,
# under the same rule. This lesson reads those kernels: five matrix products
# (an older three and two newer ones) side by side, who computes what in
# each, the choice between them, two versions of decode attention, the
# memory shuffle, and `NumbaBackend`, a backend like lesson 2's whose fused
# step gives every request the bits it gets alone. Then it asks NVIDIA's
# compiler what it makes of the kernels, and what a roofline model expects
# of them on an H100.
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

# %%
# ruff: noqa: E402  (each cell imports what it first uses, as a reader meets it)
import os
import shutil
import subprocess
import sys


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
# neither a GPU nor the simulator. The helpers of lesson 1 follow:
# `show(fig, name)` for pictures.

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
from _display import show  # tutorials/_display.py
from numba import cuda

from numba_kernels.device import device_name, require_cuda, simulated

require_cuda()
RUNS_ON = "the CUDA simulator (on the CPU)" if simulated() else f"the GPU {device_name()}"
print("kernels run on", RUNS_ON)

# %% [markdown]
# ## Threads, blocks and grids
#
# A GPU is built of **multiprocessors** (SMs, *streaming multiprocessors*:
# 132 on an H100), each a processor of its own with many arithmetic units.
# A CUDA **kernel** is a function that many **threads** run at once, each
# on its own piece of the data. Threads come in **blocks** of up to 1024; a
# block runs on one multiprocessor, and an SM runs several blocks at once.
# Inside an SM the threads go in **warps** of 32 that execute the same
# instruction together, like the SIMD lanes of lesson 8. Each thread has its
# own **registers** (the fastest storage; an SM has 65,536 of 4 bytes,
# shared out among the threads it runs). The threads of one block can share
# a small fast **shared memory** on their SM (up to 228 KB an SM on an H100),
# and wait for each other at a **barrier** (`cuda.syncthreads()`). The GPU's
# main memory (lesson 3's HBM) is called **global memory**: large, but each
# read takes hundreds of clock cycles to arrive.
#
# The blocks of one launch form the **grid**; they run in any order and
# cannot wait for each other. A thread knows where it stands from
# `cuda.threadIdx` (its place in its block), `cuda.blockIdx` (its block's
# place in the grid) and `cuda.blockDim` (the block's size), each with `.x`,
# `.y`, `.z` for grids and blocks of up to three dimensions. In Numba,
# `@cuda.jit` makes a kernel (compiled for the GPU, as `@njit` compiles for
# the CPU in lesson 8), `kernel[blocks, threads](args)` launches it,
# `cuda.to_device(a)` copies a NumPy array to the GPU and `.copy_to_host()`
# copies it back.
#
# The simulator runs each GPU thread as a Python thread, and Python passes
# the interpreter from one thread to the next every 5 ms by default. At a
# barrier every thread of a block must get its turn, so each barrier costs
# milliseconds. Under the simulator we switch every 0.1 ms instead, as
# flover's tests do (`numba_kernels.simulator.quick_switching`); on a GPU
# nothing changes. (Importing `numba_kernels` under the simulator also
# closes a race in it; `numba_kernels/simulator.py` tells the story.)
#
# The smallest example: 20 elements, blocks of 8 threads, so 3 blocks (24
# threads). Each thread computes its global index and records who it is. The
# last 4 threads fall past the end and must do nothing: every kernel below
# has such a guard.


# %%
if simulated():
    sys.setswitchinterval(1e-4)


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
# ## GEMM, versions 1 to 3
#
# Every linear layer is a GEMM (lesson 8): out[M, N] = x[M, K] @ w[K, N] +
# b[N], with M rows (prompt tokens in a prefill, requests in a decode
# step). `numba_kernels/gemm.py` holds three versions, numbered in its
# header; a `Variant(kernel, params)` names one with its launch parameters,
# and `launch(variant, x, w, b, out)` runs it on device arrays.
#
# 1. **naive**, params `(threads,)`: one thread per output element. The grid
#    is (ceil(N / threads), M): `blockIdx.y` is the row, and the threads of a
#    block take consecutive columns. Each thread walks all of K, reading x and
#    w from global memory. When the 32 threads of a warp read 32 consecutive
#    floats (here, row k of w), the memory serves them as a few whole
#    32-byte pieces: the reads are **coalesced**.

# %%
from numba_kernels import gemm

print(inspect.getsource(gemm.gemm_naive.py_func))

# %% [markdown]
# 2. **tiled**, params `(BM, BN, BK, TM, TN)`: a block computes a BM x BN
#    tile of the output. It copies a BM x BK slab of x and a BK x BN slab of
#    w into shared memory, waits at a barrier, multiplies, and moves on to
#    the next BK. Each of its (BM/TM) x (BN/TN) threads keeps a TM x TN patch
#    of outputs in registers (**register blocking**), so each number read
#    from shared memory feeds several multiply-adds. Shared memory is cut
#    into 32 **banks**, consecutive 4-byte words in consecutive banks; a warp
#    reads it in one go when its 32 threads hit 32 different banks (or the
#    very same word), and waits once more for every extra word in one bank
#    (a **bank conflict**). So each thread's patch is strided: neighbouring
#    threads read neighbouring words. The kernel is compiled once per tile
#    shape, since shared and register arrays need sizes known at compile
#    time. For prefills and big batches.

# %%
print(inspect.getsource(gemm.tiled_kernel))

# %% [markdown]
# 3. **gemv**, params `(threads, ROWS)` (matrix-vector, for few rows): each
#    thread owns one output column for up to ROWS rows. It walks K reading its
#    column of w once for all its rows, coalesced across the warp; the rows
#    of x sit in shared memory. In a decode step the weights are most of the
#    bytes, so reading them once per ROWS rows is what counts.

# %%
print(inspect.getsource(gemm.gemv_kernel))

# %% [markdown]
# ## GEMM, versions 4 and 5
#
# A memory read takes hundreds of cycles to arrive, so a kernel that reads
# one number and waits for it, then the next, uses a sliver of the
# bandwidth: the memory delivers only as many bytes per second as are *in
# flight*, asked for and not yet arrived, divided by the wait (the roofline
# estimate below counts this). Versions 4 and 5 keep more reads in flight.
#
# 4. **staged** (`gemm_staged.py`), params `(threads, BN, ROWS, KC)`, the
#    GEMV for decode steps: a block owns a strip of BN = 8 output columns.
#    All its threads load the next chunk of KC rows of the strip (and of x)
#    into registers at once, coalesced, and store them to shared memory
#    while one thread per output sums the chunk before from shared memory
#    (double buffering). It can also finish each element with a fused
#    *epilogue* (a residual add, GELU, or the K/V store) instead of a
#    separate kernel.

# %%
from numba_kernels import gemm_prefetch, gemm_staged

print(inspect.getsource(gemm_staged.staged_kernel))

# %% [markdown]
# 5. **prefetch** (`gemm_prefetch.py`), no params: version 2 for prefills,
#    with 128 x 128 tiles, 8 x 8 outputs a thread, the next tile loaded into
#    registers while this one is summed, and the transposed x tile padded by
#    4 floats a row in shared memory, so the stores of a warp fall in 32
#    different banks.

# %%
print(inspect.getsource(gemm_prefetch.prefetch_kernel))

# %% [markdown]
# ## Who computes what
#
# `launch` gives each variant its grid and block (the end of
# `numba_kernels/gemm.py`). To see which block writes which output, we
# launch a kernel ourselves on *part* of its grid, on an output filled with
# a poison value: a launch of the first a columns of blocks writes exactly
# the outputs of those blocks, so the first launch that writes an output
# tells the x index of its block, and likewise for y. Blocks never read the
# grid's size, so a block computes the same outputs in a partial grid as in
# the full one. The shape is 6 x 40 with K = 4 (who computes what does not
# depend on K); at this size version 5's 128 x 128 tile would be a single
# block.
#
# In the tiled kernel the dots mark the outputs of one thread, thread (0, 0)
# of the first block: we launch that block with that one thread. Its values
# are wrong (the other threads would have loaded the rest of the tiles),
# but where they land is right: a TM x TN patch spread over the tile with a
# stride, as the source says.

# %%
from numba_kernels.gemm import Variant, launch
from numba_kernels.grid import cdiv

NAIVE, TILED, GEMV = Variant("naive", (32,)), Variant("tiled", (4, 16, 8, 2, 4)), Variant("gemv", (32, 4))
STAGED, PREFETCH = Variant("staged", (32, 8, 4, 16)), Variant("prefetch", ())


def compiled(variant: Variant):
    """(kernel, threads a block, outputs a block covers as (columns, rows)), as ``launch`` uses them."""
    p = variant.params
    if variant.kernel == "naive":
        return gemm.gemm_naive, p[0], (p[0], 1)
    if variant.kernel == "tiled":
        bm, bn, _, tm, tn = p
        return gemm.tiled_kernel(*p), (bn // tn, bm // tm), (bn, bm)
    if variant.kernel == "gemv":
        return gemm.gemv_kernel(p[1]), p[0], p
    return gemm_staged.staged_kernel(*p), p[0], (p[1], p[2])  # staged


def written(variant: Variant, grid, m: int, n: int, k: int = 4, threads=None) -> np.ndarray:
    """[m, n]: which outputs a launch on ``grid`` (blocks, as (x, y)) writes."""
    kernel, block, _ = compiled(variant)
    poison = np.float32(-1.5e38)  # no product of these inputs comes out as this
    x, w = cuda.to_device(np.ones((m, k), np.float32)), cuda.to_device(np.ones((k, n), np.float32))
    b, out = cuda.to_device(np.zeros(n, np.float32)), cuda.to_device(np.full((m, n), poison, np.float32))
    kernel[grid, threads or block](x, w, b, out, *(((),) if variant.kernel == "staged" else ()))
    return out.copy_to_host() != poison


def block_map(variant: Variant, m: int, n: int) -> np.ndarray:
    """[m, n]: the number of the block (y * grid_x + x) that writes each output, found by launching part grids."""
    per_x, per_y = compiled(variant)[2]
    grid_x, grid_y = cdiv(n, per_x), cdiv(m, per_y)
    assert written(variant, (grid_x, grid_y), m, n).all(), f"{variant}: the full grid writes every output"
    x_of = sum(~written(variant, (a, grid_y), m, n) for a in range(1, grid_x))  # blocks x < a miss it: x >= a
    y_of = sum(~written(variant, (grid_x, a), m, n) for a in range(1, grid_y))
    return y_of * grid_x + x_of


M, N = 6, 40
fig, axes = plt.subplots(2, 2, figsize=(12, 5.5), layout="constrained")
for ax, variant in zip(axes.flat, (NAIVE, TILED, GEMV, STAGED)):
    owner = block_map(variant, M, N)
    per_x, per_y = compiled(variant)[2]
    sizes = np.bincount(owner.ravel())
    print(f"{variant!s:18s} {len(sizes):2d} blocks, each writing at most {per_y} x {per_x} outputs")
    assert len(sizes) == cdiv(N, per_x) * cdiv(M, per_y) and sizes.min() > 0, "every block has work"
    assert sizes.max() == min(per_x, N) * min(per_y, M), "a block writes its whole tile, no more"
    ax.imshow(owner % 10, cmap="tab10", vmin=0, vmax=9, interpolation="nearest", aspect="auto")
    for block in range(len(sizes)):
        rows_of, cols_of = np.nonzero(owner == block)
        ax.text(cols_of.mean(), rows_of.mean(), str(block), ha="center", va="center", color="white", fontsize=8)
    ax.set(title=f"{variant}: {len(sizes)} blocks", xlabel="column n", ylabel="row m")
bm, bn, _, tm, tn = TILED.params
one_thread = written(TILED, (1, 1), M, N, threads=(1, 1))  # block (0, 0) with its thread (0, 0) only
patch = np.zeros((M, N), bool)
patch[np.ix_(np.arange(tm) * (bm // tm), np.arange(tn) * (bn // tn))] = True  # rows ty + i BM/TM, columns tx + j BN/TN
assert np.array_equal(one_thread, patch), "thread (0, 0) writes a strided TM x TN patch"
axes[0, 1].scatter(*np.nonzero(one_thread)[::-1], color="black", s=14)
fig.suptitle(f"which block writes each output of a {M} x {N} GEMM (dots: thread (0, 0) of the tiled kernel)")
show(fig, "09_gemm_blocks.png")

# %% [markdown]
# Now run all five on M = 12, K = 24, N = 40: shapes that leave partial
# tiles and chunks at the edges. Each output array starts full of NaN, so an
# element a kernel forgot to write would show. Each result is checked
# against NumPy in float64, and all five against each other, **bitwise**.

# %%
rng = np.random.default_rng(0)
M, K = 12, 24
x = rng.standard_normal((M, K), dtype=np.float32)
w = rng.standard_normal((K, N), dtype=np.float32)
b = rng.standard_normal(N, dtype=np.float32)


def run_gemm(variant: Variant, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [M, K] @ w [K, N] + b [N] with one variant, on the device; -> [M, N] on the host."""
    out = cuda.to_device(np.full((x.shape[0], w.shape[1]), np.nan, np.float32))  # poisoned
    launch(variant, cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), out)
    return out.copy_to_host()


exact = x.astype(np.float64) @ w + b  # [M, N]
results = {str(v): run_gemm(v, x, w, b) for v in (NAIVE, TILED, GEMV, STAGED, PREFETCH)}
for name, got in results.items():
    print(f"{name:18s} max |error| vs float64 {np.abs(got - exact).max():.1e}, "
          f"bitwise equal to naive: {np.array_equal(got, results[str(NAIVE)])}")  # fmt: skip
    assert not np.isnan(got).any(), f"{name} left an output unwritten"
    assert np.allclose(got, exact, rtol=1e-5, atol=1e-5), name
    assert np.array_equal(got, results[str(NAIVE)]), f"{name} differs from naive"
blas = x @ w + b  # NumPy in float32: the same product, summed in BLAS's order
print(f"NumPy float32 (BLAS): {np.count_nonzero(blas != results[str(NAIVE)])} of {blas.size} outputs differ from the kernels")

# %% [markdown]
# Why bitwise equal, when lesson 8 showed that summing in another order
# changes the last bits? Because the five versions differ in *who* computes
# an element and *where the inputs wait* (global memory, shared memory,
# registers), never in the order of the sum. Every output element is summed
# by one thread, over k ascending, with one fused multiply-add per k
# (`cuda.fma`), and the bias comes last. No version splits K between threads
# or blocks. (The simulator's `cuda.fma` rounds twice, a GPU's once; every
# version uses it, so they agree on either.)
#
# The price: a launch has at most N x M threads summing, each walking all
# of K, one dependent FMA after another. A big GPU with a
# narrow layer at batch 1 has few threads to keep busy; splitting K would
# fix that and break the rule.
#
# ## Dispatch: which GEMM a shape gets
#
# Since every variant gives the same bits, choosing one is about speed only.
# `numba_kernels.dispatch.Dispatch(table)` picks one per shape (M, N, K) and
# `dispatch.gemm(x, w, b, out)` runs it. Without a table entry for the shape,
# `default_variant(m, n, k)` decides: M <= 8, `staged` (decode steps); up to
# 64, `tiled` with 32 x 32 tiles (big batches); above, `prefetch`
# (prefills). Here for GPT-2 124M's attention input projection, K = 768 ->
# N = 2304:

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
table = {f"4x{N}x{K}": TILED, f"16x{N}x{K}": NAIVE}
dispatch = Dispatch(table)
for m in (1, 2, 4, 6, 12, 16, 20):
    print(f"M = {m:2d}, N = {N}, K = {K}: {dispatch.choose(m, N, K)}")
assert dispatch.choose(4, N, K) == TILED, "an exact entry"
assert dispatch.choose(6, N, K) == TILED and dispatch.choose(20, N, K) == NAIVE, "the largest tuned M below"
assert dispatch.choose(2, N, K) == default_variant(2, N, K), "nothing tuned at or below M = 2"
assert dispatch.choose(4, 64, K) == default_variant(4, 64, K), "another (N, K): the rule"

# %% [markdown]
# This is batch invariance once more: a request's row goes through whatever
# variant the batch size selects (the staged GEMV alone, tiles in a batch
# of 12), and gets the same bits.

# %%
for m in (1, 2, 6, 12):
    got = dispatch.gemm(cuda.to_device(x[:m]), cuda.to_device(w), cuda.to_device(b),
                        cuda.device_array((m, N), np.float32)).copy_to_host()  # fmt: skip
    assert np.array_equal(got, results[str(NAIVE)][:m]), f"the first {m} rows changed with M"
print("rows 0..m-1 bitwise the same at M = 1, 2, 6, 12, whichever variant ran")

# %% [markdown]
# ## Decode attention over the KV slots, version 1
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

# %%
from numba_kernels import attention as attention_v1

print(inspect.getsource(attention_v1.attention_kernel.py_func))

# %% [markdown]
# To show that a request reads only its own length, poison every position
# past it with NaN: any NaN read would spread to the output.

# %%
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
    """Version 1 on the device; -> [B, C] on the host."""
    out = cuda.to_device(np.full((len(slots), C), np.nan, np.float32))
    attention_v1.attention(cuda.to_device(qkv), cuda.to_device(k_cache), cuda.to_device(v_cache),
                           cuda.to_device(slots.astype(np.int32)), cuda.to_device(lengths.astype(np.int32)), out)  # fmt: skip
    return out.copy_to_host()


out = decode_attention(qkv, slots, lengths)  # [3, C]
q = np.ascontiguousarray(qkv[:, :C].reshape(len(slots), H, D))  # [B, H, D]
cpu = invariant.decode_attention(q, k_cache, v_cache, slots, lengths).reshape(len(slots), C)  # lesson 8's kernel
print(f"NaN in the output: {np.isnan(out).any()}; max |GPU kernel - CPU| {np.abs(out - cpu).max():.1e}")
assert not np.isnan(out).any(), "no request read past its own length"
assert np.allclose(out, cpu, rtol=1e-5, atol=1e-5)
for r in range(len(slots)):
    alone = decode_attention(qkv[r : r + 1], slots[r : r + 1], lengths[r : r + 1])
    assert np.array_equal(alone[0], out[r]), f"request {r} changed in a batch"
print("each request's attention is bitwise the same alone and in the batch")

# %% [markdown]
# The same file holds `store_kv`, which writes each new token's k and v into
# its slot at its position and records the slot's length, and
# `prefill_attention(qkv, k_cache, v_cache, slot, out)`, the causal
# attention of a prompt already stored in one slot: query i of the prompt is
# a decode query over length i + 1, so the causal mask of lesson 1 comes for
# free, and each prompt row gets the bits it would get decoded alone, one
# token at a time. Slot 0 holds 17 positions; take its first 4 as a prompt:

# %%
prompt_qkv = rng.standard_normal((4, 3 * C), dtype=np.float32)  # [T, 3C]: 4 prompt rows in slot 0
prefill = cuda.to_device(np.full((4, C), np.nan, np.float32))
attention_v1.prefill_attention(cuda.to_device(prompt_qkv), cuda.to_device(k_cache), cuda.to_device(v_cache), 0, prefill)
prefill = prefill.copy_to_host()
for i in range(4):
    one_token = decode_attention(prompt_qkv[i : i + 1], np.array([0]), np.array([i + 1]))
    assert np.array_equal(one_token[0], prefill[i]), f"prompt row {i} differs from its decode"
print("prefill_attention: each of 4 prompt rows bitwise equal to decoding its token alone")

# %% [markdown]
# ## Decode attention, version 2: chunks of positions
#
# Version 1 gives a request at batch 1 only H blocks (12 on GPT-2 124M, on
# a GPU of 132 multiprocessors). Version 2 (`attention_chunked.py`, the one
# `NumbaBackend` runs) cuts each query's positions into fixed chunks of 64
# (for head_dim <= 64): one block per (request, head, chunk) scores its chunk
# and writes the chunk's partial result (its weighted V, maximum and sum of
# exponentials), and a second kernel combines the chunks in chunk order.
# The chunks are fixed positions 0..63, 64..127, ..., so the order of every
# sum is still a function of the request's own length. Its two kernels:

# %%
from numba_kernels import attention_chunked as attention_v2

print(inspect.getsource(attention_v2.chunk_kernel))
print(inspect.getsource(attention_v2.combine_kernel))

# %% [markdown]
# A context of 80 positions, so that a request can span two chunks: the
# three requests again (one now of 70 positions) against lesson 8's kernel,
# then three rows of a prompt chunk at positions 62 to 64, across the chunk
# boundary at 64, in one launch, each against its decode alone.

# %%
n_ctx2 = 80
k_cache2 = rng.standard_normal((n_slots, H, n_ctx2, D), dtype=np.float32)
v_cache2 = rng.standard_normal((n_slots, H, n_ctx2, D), dtype=np.float32)


def chunked_attention(qkv: np.ndarray, slots: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Version 2 on the device; -> [B, C] on the host."""
    out = cuda.device_array((len(slots), C), np.float32)
    attention_v2.attention(cuda.to_device(qkv), cuda.to_device(k_cache2), cuda.to_device(v_cache2),
                           cuda.to_device(slots.astype(np.int32)), cuda.to_device(lengths.astype(np.int32)), out)  # fmt: skip
    return out.copy_to_host()


lengths2 = np.array([5, 70, 9])
out2 = chunked_attention(qkv, slots, lengths2)  # [3, C]
cpu2 = invariant.decode_attention(q, k_cache2, v_cache2, slots, lengths2).reshape(len(slots), C)
print(f"version 2: max |GPU kernel - CPU| {np.abs(out2 - cpu2).max():.1e}")
assert np.allclose(out2, cpu2, rtol=1e-5, atol=1e-5)

chunk_rows = chunked_attention(prompt_qkv[:3], np.zeros(3, np.int32), np.arange(63, 66))  # positions 62..64 of slot 0
for i in range(3):
    alone = chunked_attention(prompt_qkv[i : i + 1], np.array([0]), np.array([63 + i]))
    assert np.array_equal(alone[0], chunk_rows[i]), f"prompt row at position {62 + i} differs from its decode"
print("version 2: 3 prompt rows across a chunk boundary, bitwise equal to decoding each alone")

# %% [markdown]
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
# lessons 4 and 5 runs on it. It uploads the weights once and keeps the KV
# memory on the device, in Flover's slots (one block of n_ctx positions per
# request; it refuses paged blocks). A step, any mix of prompt chunks and
# decode tokens, runs from the embedding to the logits with the kernels
# above (plus layer norm and the embedding in `numba_kernels/elementwise.py`,
# each one row at a time), its GEMMs chosen by a `Dispatch`, and only the
# logits of each lane's last token come back.
#
# The simulator is slow (a Python thread per GPU thread), so we build a
# small model by hand: a `GPTConfig` (lesson 1) of 1 layer, 2 heads,
# n_embd 16, 32 tokens and a context of 16, with random weights from
# `reference.init_weights(config, seed, std)`, GPT-2's initialisation with
# a chosen standard deviation. A larger `std` than GPT-2's 0.02 gives sharper
# predictions, so different requests get visibly different tokens.

# %%
from numba_kernels import NumbaBackend
from reference import Lane, NumpyBackend, init_weights

config = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_ctx=16)
weights = init_weights(config, seed=1, std=0.3)
gpu = NumbaBackend(config, weights, n_slots=3)
cpu = NumpyBackend(config, weights, n_slots=3)
prompts = {0: [5, 17, 30], 1: [9, 2], 2: [23, 1, 20, 4]}  # slot -> prompt
lanes = [Lane.of([slot], prompt, 0) for slot, prompt in prompts.items()]  # three prefills in one step
prefilled = gpu.step(lanes)  # [3, V]: each prompt's last position, on the device
print(f"one step of {sum(len(p) for p in prompts.values())} rows in 3 lanes; "
      f"max |Numba - NumPy| {np.abs(prefilled - cpu.step(lanes)).max():.1e}")  # fmt: skip
assert np.allclose(prefilled, cpu.step(lanes), rtol=1e-4, atol=1e-4), "the same model, to rounding"

# %% [markdown]
# One fused decode step over all three slots, in a mixed order, and then each
# request alone at the same slot and position. Decoding a request again
# rewrites the same k and v at the same position, so the cache is as it was.
# Every row of the fused step is bitwise its solo decode; next to the NumPy
# backend, the logits agree to rounding and pick the same tokens.

# %%
slots = np.array([2, 0, 1])
tokens = np.array([11, 3, 30])
positions = np.array([len(prompts[s]) for s in slots])
fused = gpu.decode(slots, tokens, positions)  # [3, V]
for r in range(len(slots)):
    solo = gpu.decode(slots[r : r + 1], tokens[r : r + 1], positions[r : r + 1])  # [1, V]
    assert np.array_equal(solo[0], fused[r]), f"row {r} (slot {slots[r]}) changed in the fused step"
numpy_logits = cpu.decode(slots, tokens, positions)
print(f"fused rows == solo decodes, bitwise; max |Numba - NumPy| {np.abs(fused - numpy_logits).max():.1e}")
print(f"next tokens: {fused.argmax(axis=-1).tolist()} (Numba), {numpy_logits.argmax(axis=-1).tolist()} (NumPy), on {RUNS_ON}")
assert np.allclose(fused, numpy_logits, rtol=1e-4, atol=1e-4)
assert np.array_equal(fused.argmax(axis=-1), numpy_logits.argmax(axis=-1))

# %% [markdown]
# And lesson 2's other promise, on the device: slot 1's prompt, prefilled
# above in one step beside two other prompts, gives bitwise the last logits
# of the same prompt fed alone, one token per step, since each row is
# computed from its own token, position and cached keys and values alone.

# %%
for i, token in enumerate(prompts[1]):
    one_by_one = gpu.step([Lane.of([0], [token], i)])[0]  # steps of 1 lane of 1 token, into slot 0
assert np.array_equal(prefilled[1], one_by_one)
print("a prompt in a shared step == the prompt alone, one token at a time, bitwise, on", RUNS_ON)

# %% [markdown]
# ## What the compiler makes of them
#
# On a GPU, `@cuda.jit` hands a kernel to NVVM, NVIDIA's compiler, which
# writes **PTX**, a portable assembly language; `ptxas` then assembles the
# PTX into machine code for one architecture (`sm_90` is the H100's). Both
# run without a GPU, and `ptxas -v` says what each kernel needs:
#
# - **registers** a thread. An SM's 65,536 registers are shared by the
#   threads it runs, so more registers a thread means fewer threads at once;
#   a kernel that needs more than it gets **spills** values to slow local
#   memory (spill bytes: should be 0);
# - **shared memory** a block (smem), which limits blocks per SM the same
#   way;
# - **occupancy**: the warps an SM can hold at once for this kernel, out of
#   64. More resident warps keep more reads in flight;
# - the counts of `fma.rn.f32` instructions (every GEMM and attention sum is
#   a chain of FMAs) and of `f64` ones (a stray Python float would make the
#   arithmetic double precision: should be 0).
#
# `numba_kernels.inspect` does this for every kernel of the package
# (`python -m numba_kernels.inspect`, a minute or so); here its
# `inspect_kernel` runs on three GEMMs: versions 2, 3 and 4, each at the
# signature and block size `NumbaBackend` launches it with for GPT-2 124M
# (the list is `numba_kernels.catalog`). It
# needs NVIDIA's compiler, the packages `nvidia-nvvm` and `nvidia-cuda-nvcc`
# of flover's `cuda` extra, and runs in a second process, since the
# simulator has no compiler.

# %%
import json
from importlib.metadata import PackageNotFoundError, version

from numba_kernels.catalog import kernels
from reference.config import preset

INSPECT = """
import json, sys
from dataclasses import asdict
from numba_kernels.catalog import kernels
from numba_kernels.inspect import inspect_kernel
from reference.config import preset
print(json.dumps([asdict(inspect_kernel(k, "sm_90", preset("gpt2"))) for k in kernels() if k.name in sys.argv[1:]]))
"""
CHOSEN = ["gemm tiled 32x32x16x4x4", "gemm gemv 64x1", "gemm staged 128x8x1x512"]


def installed(package: str) -> bool:
    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True


missing = [p for p in ("nvidia-nvvm", "nvidia-cuda-nvcc") if not installed(p)]
static = {}
if missing:
    print(f"skipped: {', '.join(missing)} not installed (pip install 'flover[cuda]'), so nothing can be compiled here")
else:
    done = subprocess.run([sys.executable, "-c", INSPECT, *CHOSEN], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    static = {row["kernel"]: row for row in json.loads(done.stdout)}
    print(f"{'kernel (sm_90)':24s} {'source':24s} threads registers spill B  smem B occupancy fma.rn.f32 f64")
    for name, r in static.items():
        print(f"{name:24s} {r['source']:24s} {r['threads']:7d} {r['registers']:9d} {r['spill_bytes']:7d} "
              f"{r['shared_bytes']:7d} {r['occupancy']:9.0%} {r['fma_f32']:10d} {r['f64']:3d}")  # fmt: skip
        assert r["spill_bytes"] == 0 and r["f64"] == 0, f"{name}: spills or double precision"
        assert r["fma_f32"] > 0, f"{name} sums without fma"
    assert set(static) == set(CHOSEN)

# %% [markdown]
# ## What a roofline model expects on an H100
#
# Lesson 3's roofline gives a launch at least its bytes over the bandwidth
# and its FLOPs over the peak. `numba_kernels.roofline.estimate` adds two
# limits that these kernels meet. The bandwidth a launch can draw is at most
# the bytes it has in flight over the memory's latency (Little's law): a
# few blocks, each waiting on a few loads, draw a sliver of it (bound
# "latency"). And a **chain**: each output is one thread's K dependent FMAs,
# each waiting about 4 cycles for the one before, which no tiling removes
# (batch invariance forbids splitting K). It takes the longest limit, plus
# one memory latency. The occupancy just compiled says how many blocks an
# SM holds; the last column is lesson 3's plain roofline, bytes at full
# bandwidth. These are **estimates** from a model, with assumed latencies,
# not measurements:

# %%
from numba_kernels import roofline

print(inspect.getsource(roofline.estimate))
if static:
    gpt2 = preset("gpt2")
    print(f"estimated for an {roofline.H100.name}, GPT-2 124M, batch 1:")
    print(f"{'kernel':24s} {'launch':24s} {'blocks':>6s} {'KB a block in flight':>20s} {'estimate us':>11s} "
          f"{'bound':>8s} {'roofline us':>11s}")  # fmt: skip
    estimated = {}
    for kernel in (k for k in kernels() if k.name in static):
        label, work = kernel.launches(gpt2, 1, 1024)[0]  # the first launch is c_attn (1024: the context, unused)
        est = roofline.estimate(work, static[kernel.name]["blocks_per_sm"])
        estimated[kernel.name] = est.us
        print(f"{kernel.name:24s} {label:24s} {work.blocks:6d} {work.inflight / 1e3:20.1f} {est.us:11.1f} "
              f"{est.bound:>8s} {roofline.ideal_us(work):11.1f}")  # fmt: skip
    assert estimated["gemm staged 128x8x1x512"] < estimated["gemm gemv 64x1"] / 4, "version 4 keeps bytes in flight"
    assert estimated["gemm staged 128x8x1x512"] < estimated["gemm tiled 32x32x16x4x4"], "and beats the tiles at batch 1"

# %% [markdown]
# In the model, the old GEMV (version 3) at batch 1 keeps about 1 KB in
# flight per block in a few dozen blocks and waits on latency; the staged
# version 4 keeps 18 KB in each of 288 blocks and reaches the bandwidth,
# though its registers and shared memory leave an SM only a quarter of its
# warps: what counts is the bytes in flight, not the warps. (Version 2 of attention does the same for attention: run
# `python -m numba_kernels.inspect` for every kernel.) Whether a real H100
# agrees is for a GPU to say.
#
# ## Timing on a GPU
#
# Only a GPU can time a GPU kernel. `numba_kernels.timing.gpu_time_ms`
# queues a kernel that holds the GPU, then the launches behind it, and
# times them with events on the GPU, so that Python's cost of launching
# (tens of microseconds) is not counted. On a GPU the cell below times
# three GEMMs on GPT-2's 768 -> 2304 projection, for one row (a decode step)
# and for 512 (a prompt), and checks that at 512 rows version 5, which reads
# each weight once per 128-row tile, beats the naive kernel, which reads it
# once per row, by at least 2x. Under the simulator nothing is timed: its
# kernels are Python threads on the CPU, and their time says nothing about
# a GPU.

# %%
if simulated():
    print("no timing: the kernels ran under the CUDA simulator, on the CPU")
else:
    from numba_kernels.timing import gpu_time_ms

    timed = {}
    for m in (1, 512):  # a decode step of one request; a prompt of 512 tokens
        xd = cuda.to_device(rng.standard_normal((m, 768), dtype=np.float32))
        wd = cuda.to_device(rng.standard_normal((768, 2304), dtype=np.float32))
        bd = cuda.to_device(np.zeros(2304, np.float32))
        od = cuda.device_array((m, 2304), np.float32)
        for variant in (Variant("naive", (128,)), Variant("gemv", (64, 1)), default_variant(m, 2304, 768)):
            timed[m, variant.kernel] = 1e3 * gpu_time_ms(launch, variant, xd, wd, bd, od)
            print(f"{device_name()}, M = {m:3d}, 768 -> 2304: {variant!s:22s} {timed[m, variant.kernel]:8.1f} us")
    assert timed[512, "naive"] > 2 * timed[512, "prefetch"], "at M = 512 tiles reuse each weight across rows"

# %% [markdown]
# ## What we have
#
# - A kernel runs as a grid of blocks of threads; every thread finds its
#   piece of the data from its block and thread indices, and launching part
#   of a grid shows which block writes what.
# - Five GEMMs (naive, tiled, GEMV, staged, prefetch) move data differently
#   (global memory, shared memory, registers, reads in flight) but sum every
#   output element in one thread, over k ascending. So they are bitwise
#   equal, dispatch decides speed only, and a row gets the same bits
#   whatever its batch.
# - Decode attention gives each request its own blocks and reads only its
#   own length; version 2 cuts positions into fixed chunks, and prompt rows
#   equal their decodes bit for bit in both. The shuffle moves slots in one
#   launch.
# - `NumbaBackend` is a backend like the others: a fused step's rows equal
#   solo decodes bit for bit, and a prompt at once equals it fed token by
#   token, on a GPU as under the simulator.
# - Compiled for an H100 without one, four of the kernels show no spills
#   and no double precision, and a roofline model estimates what each
#   launch can reach; only a GPU can measure it.
# - `tests/test_numba_*.py` check all of this on random shapes, and
#   `numba_kernels/README.md` says how to tune and benchmark on a GPU.
#
# Next, lesson 10 splits one model over several processes, each holding
# part of every layer.
