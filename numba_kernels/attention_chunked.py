"""Decode attention, version 2: each query's positions in chunks, the chunks combined in chunk order.

Version 1 (``attention.py``) gives one block to each (query, head): 12
blocks for a GPT-2 124M query, each thread walking its own 256-byte K row (a
warp's load touches 32 cache lines) with a few loads in flight, and its
reductions serial in thread 0. Version 2 splits a query's positions into
chunks of CHUNK (64 for head_dim <= 64) and runs two kernels:

- ``attention_chunk``: one block per (query, head, chunk), 128 threads. The
  block stages its K and V rows [CHUNK, D] in registers, all loads issued
  before any is used (coalesced: consecutive threads read consecutive
  floats), then into padded shared memory ([CHUNK, D + 1]: no bank
  conflicts). Thread t scores position t (a dot over d ascending); the
  chunk's maximum m and sum of exponentials l are fixed-order trees
  (``reduce.tree_max``, ``tree_sum``); thread d sums its output o[d] over the
  chunk's positions ascending. It writes (o, m, l) to ``partials``.
- ``attention_combine``: one block per (query, head) loads every chunk's
  (o, m, l) into shared memory at once; then thread d, with M the largest m:
  out = sum_j o_j exp(m_j - M) / sum_j l_j exp(m_j - M), j ascending.

The chunks are fixed positions 0..63, 64..127, ... and their number is
ceil(n / CHUNK) for a query of length n: every order is a function of the
query's own length and the model's sizes, never of the batch, so a row alone
equals the row in any batch, and a prompt's rows equal decoding it token by
token. Positions past n are never read. At batch 1 and 1024 positions a
GPT-2 124M layer has 192 blocks with 32 KB in flight each.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32

from numba_kernels.device import simulated
from numba_kernels.grid import block_threads, cdiv
from numba_kernels.reduce import tree_max, tree_sum

THREADS = 128  # on a GPU; the thread count changes who loads and scores what, never a sum
SIMULATOR_THREADS = 32  # under the simulator, where each thread is a Python thread
MAX_HEAD_DIM = 256


def chunk_size(d_head: int) -> int:
    """Positions a block scores: two padded [CHUNK, D + 1] tiles fit 48 KB of static shared memory."""
    if d_head > MAX_HEAD_DIM:
        raise ValueError(f"attention version 2 holds head_dim <= {MAX_HEAD_DIM}, got {d_head}")
    return 64 if d_head <= 64 else 32 if d_head <= 128 else 16


@functools.cache
def chunk_kernel(d_head: int, threads: int = THREADS):
    """``attention_chunk`` compiled for one head_dim and block size (tiles and registers are compile-time sizes)."""
    chunk = chunk_size(d_head)
    tile = chunk * d_head
    per = cdiv(tile, threads)  # floats of K, and of V, each thread stages
    pitch = d_head + 1  # rows of K and V padded in shared memory: thread t reads row t without bank conflicts

    @cuda.jit
    def attention_chunk(qkv, k_cache, v_cache, slots, lengths, scale, partials):  # pragma: no cover - kernel
        """grid (B, H, chunks): query r, head h, positions j*CHUNK .. -> partials[r, h, j] = (o [D], m, l)."""
        r, h, j = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        s, n = slots[r], lengths[r]
        p0 = j * chunk
        if p0 >= n:  # past this query's length: the whole block leaves
            return
        count = min(chunk, n - p0)
        qs = cuda.shared.array(d_head, float32)
        ks = cuda.shared.array((chunk, pitch), float32)
        vs = cuda.shared.array((chunk, pitch), float32)
        weights = cuda.shared.array(chunk, float32)  # scores, then exponentials
        tree = cuda.shared.array(chunk, float32)
        k_next = cuda.local.array(per, float32)
        v_next = cuda.local.array(per, float32)
        for i in range(per):  # every load issued before any is used
            e = i * threads + tid
            t, d = e // d_head, e % d_head
            live = e < tile and t < count
            k_next[i] = k_cache[s, h, p0 + t, d] if live else float32(0.0)
            v_next[i] = v_cache[s, h, p0 + t, d] if live else float32(0.0)
        for d in range(tid, d_head, threads):
            qs[d] = qkv[r, h * d_head + d]
        for i in range(per):
            e = i * threads + tid
            if e < tile:
                ks[e // d_head, e % d_head] = k_next[i]
                vs[e // d_head, e % d_head] = v_next[i]
        cuda.syncthreads()
        for t in range(tid, chunk, threads):  # one thread a position
            score = float32(-math.inf)
            if t < count:
                dot = float32(0.0)
                for d in range(d_head):
                    dot = cuda.fma(qs[d], ks[t, d], dot)
                score = dot * scale
            weights[t] = score
            tree[t] = score
        best = tree_max(tree, chunk)
        for t in range(tid, chunk, threads):
            e = math.exp(weights[t] - best)  # 0 past the length
            weights[t] = e
            tree[t] = e
        total = tree_sum(tree, chunk)  # its barriers also publish every weight
        for d in range(tid, d_head, threads):
            acc = float32(0.0)
            for t in range(count):
                acc = cuda.fma(weights[t], vs[t, d], acc)
            partials[r, h, j, d] = acc
        if tid == 0:
            partials[r, h, j, d_head] = best
            partials[r, h, j, d_head + 1] = total

    return attention_chunk


@functools.cache
def combine_kernel(d_head: int, chunks: int):
    """``attention_combine`` for one head_dim and the most chunks of the model's context."""
    chunk = chunk_size(d_head)
    width = d_head + 2  # a chunk's (o [D], m, l)

    @cuda.jit
    def attention_combine(partials, lengths, out):  # pragma: no cover - kernel
        """grid (B, H): query r, head h from its chunks' (o, m, l) in chunk order -> out [B, C]."""
        r, h = cuda.blockIdx.x, cuda.blockIdx.y
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        staged = cuda.shared.array((chunks, width), float32)  # every chunk's partials, loaded at once
        n_chunks = (lengths[r] + chunk - 1) // chunk
        for e in range(tid, n_chunks * width, nt):
            staged[e // width, e % width] = partials[r, h, e // width, e % width]
        cuda.syncthreads()
        for d in range(tid, d_head, nt):
            best = float32(-math.inf)
            for j in range(n_chunks):
                best = max(best, staged[j, d_head])
            total = float32(0.0)
            acc = float32(0.0)
            for j in range(n_chunks):
                scale = math.exp(staged[j, d_head] - best)
                total = cuda.fma(staged[j, d_head + 1], scale, total)
                acc = cuda.fma(staged[j, d], scale, acc)
            out[r, h * d_head + d] = acc / total

    return attention_combine


def partials_shape(rows: int, n_head: int, n_ctx: int, d_head: int) -> tuple[int, int, int, int]:
    """The scratch of ``attention``: [rows, H, chunks of n_ctx, D + 2]."""
    return rows, n_head, cdiv(n_ctx, chunk_size(d_head)), d_head + 2


def attention(qkv, k_cache, v_cache, slots, lengths, out, partials=None, longest: int | None = None,
              threads: int | None = None, stream=0):  # fmt: skip
    """Each query row over its own slot and length: qkv [B, 3C] -> out [B, C].

    partials: scratch of at least ``partials_shape`` (allocated if None); longest: the longest length among
    the rows, if known (it bounds the grid; blocks past a row's own length leave at once); threads: the
    chunk kernel's block size (default: 128 on a GPU, 32 under the simulator), which changes no result."""
    b, (_, n_head, n_ctx, d_head) = qkv.shape[0], k_cache.shape
    if b == 0:
        return out
    shape = partials_shape(b, n_head, n_ctx, d_head)
    if partials is None:
        partials = cuda.device_array(shape, np.float32, stream=stream)
    elif partials.shape[0] < b or partials.shape[1:] != shape[1:]:
        raise ValueError(f"attention partials {partials.shape} do not hold {shape}")
    chunks = cdiv(longest if longest is not None else n_ctx, chunk_size(d_head))
    scale = np.float32(1.0 / math.sqrt(d_head))
    threads = threads or (SIMULATOR_THREADS if simulated() else THREADS)
    launch = chunk_kernel(d_head, threads)[(b, n_head, chunks), threads, stream]
    launch(qkv, k_cache, v_cache, slots, lengths, scale, partials)
    combine = combine_kernel(d_head, partials.shape[2])
    combine[(b, n_head), block_threads(d_head, 1024), stream](partials, lengths, out)
    return out
