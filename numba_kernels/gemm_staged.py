"""GEMM version 4, the staged GEMV: loading apart from summing, for the decode step (see ``gemm.py``).

Version 3 (``gemm.py``) gives each thread one output column and lets it walk
K reading its column of w: at N = 768 that is 12 blocks of 64 threads, each
with four 4-byte loads in flight, about 12 KB on the whole GPU where an H100
needs about 2 MB to keep its memory busy (``roofline.py``). Version 4 keeps
the rule (one thread sums one output element over k ascending with
``cuda.fma``, the bias last; so it is bitwise equal to versions 1-3) and
changes who loads:

- a block owns a strip of BN output columns (BN = 8: each k row of the strip
  is one 32-byte sector) and ROWS rows of x, so N = 768 gives 96 blocks and
  N = 2304 gives 288, enough for every multiprocessor;
- K is walked in chunks of KC. All the block's threads (128) load the next
  chunk of the strip ([KC, BN] of w) and of x ([ROWS, KC]) into registers,
  coalesced, before anyone sums, so a block has KC x BN x 4 bytes (16 KB at
  KC = 512) in flight while the current chunk is summed from shared memory
  (double buffering through registers: Numba has no asynchronous copy);
- thread (r, c) < ROWS x BN sums output (m0 + r, n0 + c) from shared memory,
  a loop of constant length KC (terms past K are zeros of both x and w, and
  fma(0, 0, acc) == acc), then hands acc + b[n] to the epilogue
  (``epilogue.py``: plain, residual add, GELU or K/V store).

What it cannot remove: a K-long chain of dependent FMAs in one thread,
K x 4 cycles (1.6 us at K = 768, 6.2 us at K = 3072 on an H100), the price of
batch invariance; at batch 1 the narrow projections are bound by it, not by
memory.
"""

from __future__ import annotations

import functools

from numba import cuda, float32

from numba_kernels.epilogue import STORES

THREADS = 128  # on a GPU; the thread count changes who loads what, never a sum
MAX_SHARED_BYTES = 48 * 1024


def check(threads: int, bn: int, rows: int, kc: int) -> None:
    """Refuse a strip the kernel cannot stage: every thread stages the same count, in static shared memory."""
    if (kc * bn) % threads or (kc * rows) % threads or bn * rows > threads:
        raise ValueError(f"staged gemv {threads} threads, BN={bn} ROWS={rows} KC={kc}: KC*BN and KC*ROWS must be "
                         f"multiples of the threads, and BN*ROWS at most the threads")  # fmt: skip
    if shared_bytes(bn, rows, kc) > MAX_SHARED_BYTES:
        raise ValueError(f"staged gemv BN={bn} ROWS={rows} KC={kc}: two chunks need {shared_bytes(bn, rows, kc)} bytes "
                         f"of shared memory, more than {MAX_SHARED_BYTES}")  # fmt: skip


def shared_bytes(bn: int, rows: int, kc: int) -> int:
    return 4 * 2 * (kc * bn + rows * (kc + 1))


@functools.cache
def staged_kernel(threads: int, bn: int, rows: int, kc: int, epilogue: str = "bias"):
    """Version 4 compiled for one block and strip shape and epilogue (shared and register sizes are compile-time)."""
    check(threads, bn, rows, kc)
    per_w, per_x = kc * bn // threads, kc * rows // threads  # floats each thread stages a chunk
    row_pitch = kc + 1  # x rows padded in shared memory: the threads of a warp read 4 rows at once
    store = STORES[epilogue]

    @cuda.jit
    def gemm_staged(x, w, b, out, aux):  # pragma: no cover - kernel
        """[M, K] @ [K, N] + [N] -> epilogue into out; grid (ceil(N / BN), ceil(M / ROWS)), ``threads``."""
        m_dim, k_dim = x.shape
        n_dim = w.shape[1]
        ws = cuda.shared.array((2, kc, bn), float32)  # two chunks of the strip of w
        xs = cuda.shared.array((2, rows, row_pitch), float32)  # two chunks of x
        w_next = cuda.local.array(per_w, float32)  # the chunk in flight, in registers
        x_next = cuda.local.array(per_x, float32)
        tid = cuda.threadIdx.x
        n0, m0 = cuda.blockIdx.x * bn, cuda.blockIdx.y * rows
        r, c = tid // bn, tid % bn
        m, n = m0 + r, n0 + c
        step_w, k_w, n_w = threads // bn, tid // bn, n0 + tid % bn  # the strip is loaded in passes of threads/BN rows
        column = n_w < n_dim
        sums = r < rows and m < m_dim and n < n_dim
        acc = float32(0.0)
        n_chunks = (k_dim + kc - 1) // kc
        for j in range(n_chunks + 1):  # step j: load chunk j, sum chunk j - 1
            k0 = j * kc
            if j < n_chunks:
                for i in range(per_w):  # consecutive threads, consecutive columns then rows: whole sectors
                    k = k0 + i * step_w + k_w
                    w_next[i] = w[k, n_w] if k < k_dim and column else float32(0.0)
                for i in range(per_x):
                    e = i * threads + tid
                    mm, k = m0 + e // kc, k0 + e % kc
                    x_next[i] = x[mm, k] if k < k_dim and mm < m_dim else float32(0.0)
            if j > 0 and sums:  # chunk j - 1 while chunk j is on its way
                buf = (j - 1) % 2
                for kk in range(min(kc, k_dim - k0 + kc)):  # the chunk's real k only
                    acc = cuda.fma(xs[buf, r, kk], ws[buf, kk, c], acc)
            if j < n_chunks:
                buf = j % 2
                for i in range(per_w):
                    ws[buf, i * step_w + k_w, c] = w_next[i]
                for i in range(per_x):
                    e = i * threads + tid
                    xs[buf, e // kc, e % kc] = x_next[i]
            cuda.syncthreads()
        if sums:
            store(out, aux, m, n, acc + b[n])

    return gemm_staged
