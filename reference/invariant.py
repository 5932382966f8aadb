"""Batch-invariant kernels for the fused decode step (Numba, CPU).

Why these exist: a request's logits must not depend on which other requests
share its decode step. NumPy's BLAS breaks that. A 1-row matmul goes to GEMV,
which sums K in another order than the GEMM that a 32-row batch gets, and a
GEMM's blocking may depend on M; NumPy's SIMD reductions and transcendental
functions treat an element differently in the vector body and the tail.

So every kernel here computes one request's row with a loop whose order is
fixed by the row's own sizes (K, n_embd, the request's own length) and never
by the batch: an output element accumulates its K products one after another
in ascending k, in one thread, and batch rows are only an outer loop. The
result is bitwise equal whether a request decodes alone or beside 63 others,
by construction, and ``tests/test_batch_invariance.py`` checks it.

Parallelism comes from splitting the *output columns* over threads (each
element still summed by one thread), and speed from vectorising across output
columns, which reorders nothing.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

TILE_N = 64  # output columns per task: 4 AVX-512 vectors


@njit(parallel=True, fastmath={"contract"}, cache=True)
def matmul_rows(x, w, b):  # pragma: no cover - compiled
    """[B, K] @ [K, N] + [N] -> [B, N], each element summed over ascending k."""
    n_rows, k_dim = x.shape
    n_out = w.shape[1]
    out = np.empty((n_rows, n_out), np.float32)
    n_tiles = (n_out + TILE_N - 1) // TILE_N
    for tile in prange(n_tiles):
        j0 = tile * TILE_N
        j1 = min(j0 + TILE_N, n_out)
        for r in range(n_rows):
            acc = out[r, j0:j1]
            acc[:] = 0.0
            for k in range(k_dim):
                xv = x[r, k]
                wk = w[k, j0:j1]
                for j in range(j1 - j0):
                    acc[j] += xv * wk[j]
            for j in range(j1 - j0):
                acc[j] += b[j0 + j]
    return out


@njit(parallel=True, cache=True)
def layer_norm_rows(x, g, b, eps):  # pragma: no cover - compiled
    """Row-wise layer norm: [B, C] -> [B, C], sums taken in ascending order."""
    n_rows, c = x.shape
    out = np.empty_like(x)
    for r in prange(n_rows):
        total = np.float32(0.0)
        for i in range(c):
            total += x[r, i]
        mean = total / np.float32(c)
        sq = np.float32(0.0)
        for i in range(c):
            d = x[r, i] - mean
            sq += d * d
        inv = np.float32(1.0) / np.sqrt(sq / np.float32(c) + np.float32(eps))
        for i in range(c):
            out[r, i] = g[i] * ((x[r, i] - mean) * inv) + b[i]
    return out


@njit(parallel=True, cache=True)
def gelu_rows(x):  # pragma: no cover - compiled
    """GPT-2's tanh GELU, row by row: [B, D] -> [B, D]."""
    n_rows, d = x.shape
    out = np.empty_like(x)
    c = np.float32(math.sqrt(2.0 / math.pi))
    for r in prange(n_rows):
        for i in range(d):
            v = x[r, i]
            out[r, i] = np.float32(0.5) * v * (np.float32(1.0) + math.tanh(c * (v + np.float32(0.044715) * v * v * v)))
    return out


@njit(parallel=True, cache=True)
def decode_attention(q, k_cache, v_cache, slots, lengths):  # pragma: no cover - compiled
    """One query per request over its own cached positions.

    q: [B, n_head, head_dim]; k_cache, v_cache: [n_slots, n_head, n_ctx, head_dim];
    request b reads slot ``slots[b]`` positions ``0 .. lengths[b]-1`` and nothing else.
    -> [B, n_head, head_dim]
    """
    n_rows, n_head, head_dim = q.shape
    out = np.empty_like(q)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for task in prange(n_rows * n_head):
        r = task // n_head
        h = task % n_head
        s = slots[r]
        n = lengths[r]
        scores = np.empty(n, np.float32)
        best = np.float32(-np.inf)
        for t in range(n):
            dot = np.float32(0.0)
            for d in range(head_dim):
                dot += q[r, h, d] * k_cache[s, h, t, d]
            scores[t] = dot * scale
            best = max(best, scores[t])
        denom = np.float32(0.0)
        for t in range(n):
            scores[t] = math.exp(scores[t] - best)
            denom += scores[t]
        for d in range(head_dim):
            out[r, h, d] = 0.0
        for t in range(n):
            p = scores[t]
            for d in range(head_dim):
                out[r, h, d] += p * v_cache[s, h, t, d]
        for d in range(head_dim):
            out[r, h, d] /= denom
    return out
