"""Attention over the slot-layout KV cache, and the store of new K and V into it.

Cache layout, one layer: k_cache, v_cache [n_slots, H, n_ctx, D], as in
``reference/kv.py``. Queries come straight from the c_attn output
qkv [B, 3C] (q, k, v side by side, heads inside each), and the result is
written with heads merged, [B, C], ready for the output projection.

Kernels:

- ``store_kv_kernel``: row r's k and v into slot slots[r] at positions[r];
  one block per row. It also records the slot's length in the
  per-slot state ``slot_lengths`` (the memory shuffle moves it with the slot).
- ``attention_kernel``, one version: one block per (query, head), so a
  request's row never shares a reduction with another request. The block
  (1) scores positions 0..n-1 of its own slot, thread t taking t, t+T, ...,
  each dot product over d ascending; (2) takes the maximum and the sum of
  exponentials with fixed-order block reductions (``reduce.py``); (3) weights
  V, each of G = T / D groups summing its own strided positions over t
  ascending, the G partial sums then added in group order. Every order is
  fixed by the request's own length n, D and the block size T: never by the
  batch. Positions past n are never read.

One block per (query, head) means only B x H blocks: at batch 1 (12 blocks
for GPT-2 124M) most of a large GPU idles. Splitting each query's positions
into fixed-size chunks, combined in chunk order, would keep the order a
function of the request's own length (still batch invariant); it is not done
here, to keep one kernel a reader can follow.

Causal prefill reuses the same kernel: query i of a prompt is a decode query
over length i + 1, so the causal mask is implicit, and a prefill's rows are
bitwise the rows the prompt would give decoded one token at a time.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from numba_kernels.grid import block_threads
from numba_kernels.reduce import MAX_THREADS, block_max, block_sum, reduce_threads

MAX_THREADS_ATTENTION = 128
MAX_HEAD_DIM = MAX_THREADS  # the V partial sums share a [MAX_THREADS] scratch
MAX_SHARED_BYTES = 48 * 1024  # a block's static limit; the scores of one query live in shared memory


@cuda.jit
def store_kv_kernel(qkv, k_cache, v_cache, slots, positions, slot_lengths):  # pragma: no cover - kernel
    """qkv [B, 3C] -> k_cache, v_cache [n_slots, H, n_ctx, D] at (slots[r], positions[r]); grid (B,)."""
    r = cuda.blockIdx.x
    d_head = k_cache.shape[3]
    c = k_cache.shape[1] * d_head
    s, t = slots[r], positions[r]
    for i in range(cuda.threadIdx.x, c, cuda.blockDim.x):  # i = h * D + d
        k_cache[s, i // d_head, t, i % d_head] = qkv[r, c + i]
        v_cache[s, i // d_head, t, i % d_head] = qkv[r, 2 * c + i]
    # the last row of a slot in this launch (prefill rows share one slot) records its length
    if cuda.threadIdx.x == 0 and (r + 1 == slots.shape[0] or slots[r + 1] != s):
        slot_lengths[s] = t + 1


@cuda.jit
def attention_kernel(qkv, k_cache, v_cache, slots, lengths, scale, out):  # pragma: no cover - kernel
    """Query r over positions 0..lengths[r]-1 of slot slots[r]: qkv [B, 3C] -> out [B, C]; grid (B, H).

    Dynamic shared memory: n_ctx floats for the scores.
    """
    r, h = cuda.blockIdx.x, cuda.blockIdx.y
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    d_head = k_cache.shape[3]
    s, n = slots[r], lengths[r]
    part = cuda.shared.array(MAX_THREADS, float32)
    v_part = cuda.shared.array(MAX_THREADS, float32)  # [G, D] partial sums of the weighted V
    scores = cuda.shared.array(0, float32)  # [n_ctx]
    q0 = h * d_head  # this head's query in qkv; every thread reads it, so it stays in L1

    best = float32(-math.inf)
    for t in range(tid, n, nt):
        dot = float32(0.0)
        for d in range(d_head):
            dot = cuda.fma(qkv[r, q0 + d], k_cache[s, h, t, d], dot)
        scores[t] = dot * scale
        best = max(best, scores[t])
    best = block_max(part, best)

    total = float32(0.0)
    for t in range(tid, n, nt):
        e = math.exp(scores[t] - best)
        scores[t] = e
        total += e
    denom = block_sum(part, total)  # its barriers also publish every score

    groups = max(1, nt // d_head)
    g = tid // d_head
    if g < groups:
        for d in range(tid % d_head, d_head, nt):
            acc = float32(0.0)
            for t in range(g, n, groups):  # a group's D threads read one row of V: coalesced
                acc = cuda.fma(scores[t], v_cache[s, h, t, d], acc)
            v_part[g * d_head + d] = acc
    cuda.syncthreads()
    for d in range(tid, d_head, nt):
        acc = float32(0.0)
        for gg in range(groups):
            acc += v_part[gg * d_head + d]
        out[r, h * d_head + d] = acc / denom


def attention_threads(n_ctx: int) -> int:
    """Block size, fixed by the model's context alone so it never depends on a batch."""
    return min(MAX_THREADS_ATTENTION, reduce_threads(n_ctx))


def store_kv(qkv, k_cache, v_cache, slots, positions, slot_lengths, stream=0) -> None:
    if qkv.shape[0]:
        threads = block_threads(qkv.shape[1] // 3, MAX_THREADS)
        store_kv_kernel[qkv.shape[0], threads, stream](qkv, k_cache, v_cache, slots, positions, slot_lengths)


def attention(qkv, k_cache, v_cache, slots, lengths, out, stream=0):
    """Each query row over its own slot and length: qkv [B, 3C] -> out [B, C]."""
    _, n_head, n_ctx, d_head = k_cache.shape
    if d_head > MAX_HEAD_DIM or 4 * n_ctx > MAX_SHARED_BYTES:
        raise ValueError(
            f"attention kernel holds head_dim <= {MAX_HEAD_DIM} and n_ctx <= {MAX_SHARED_BYTES // 4}, "
            f"got head_dim {d_head} and n_ctx {n_ctx}"
        )
    if qkv.shape[0]:
        scale = np.float32(1.0 / math.sqrt(d_head))
        launch = attention_kernel[(qkv.shape[0], n_head), attention_threads(n_ctx), stream, 4 * n_ctx]
        launch(qkv, k_cache, v_cache, slots, lengths, scale, out)
    return out


def prefill_attention(qkv, k_cache, v_cache, slot: int, out, stream=0):
    """Causal attention of one prompt already stored in ``slot``: qkv [T, 3C] -> out [T, C]."""
    n = qkv.shape[0]
    slots = cuda.to_device(np.full(n, slot, np.int32), stream=stream)
    lengths = cuda.to_device(np.arange(1, n + 1, dtype=np.int32), stream=stream)
    return attention(qkv, k_cache, v_cache, slots, lengths, out, stream)
