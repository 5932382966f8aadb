"""GEMM version 5: tiles in padded shared memory, 8 x 8 outputs a thread, the next tile prefetched (see ``gemm.py``).

Version 2 (``gemm.py``) stores its x tile transposed with a row stride of BM
floats, a multiple of 32: the threads of a warp that store one column hit
one bank, 8 to 16 ways. It keeps 4 x 4 outputs a thread (8 shared loads for
16 FMAs) and loads a tile only after the last one is summed. Version 5:

- the x tile is stored transposed with a stride of BM + 4 floats, so the
  32 stores of a warp (8 k by 4 rows) fall in 32 banks; w tiles need no pad;
- a 16 x 16 block computes a 128 x 128 tile of the output, each thread an
  8 x 8 patch strided by 16 (rows ty, ty + 16, ...; columns tx, tx + 16,
  ...), so the 16 reads of a warp's row of ws are consecutive and its x
  reads are two broadcasts: 16 shared loads feed 64 FMAs;
- while tile t is summed from shared memory, tile t + 1 is already in
  registers (each thread holds 4 floats of x and 4 of w): its loads are in
  flight during the FMAs.

The rule is unchanged: output (m, n) is summed by one thread over k
ascending with ``cuda.fma``, the bias last, so version 5 is bitwise equal to
versions 1-4.
"""

from __future__ import annotations

import functools

from numba import cuda, float32

BM = BN = 128
BK = 8
TM = TN = 8
SIDE = 16  # threads a side: 16 x 16 = 256, each 8 x 8 outputs
THREADS = SIDE * SIDE
PAD = 4  # floats after each transposed x row: 8 k by 4 rows of a warp's stores in 32 banks
PER = BM * BK // THREADS  # floats of x (and of w) each thread loads a tile: 4


@functools.cache
def prefetch_kernel():
    """Version 5 (one shape of tile: its sizes are compile-time)."""
    pitch = BM + PAD

    @cuda.jit
    def gemm_prefetch(x, w, b, out):  # pragma: no cover - kernel
        """[M, K] @ [K, N] + [N] -> [M, N]; grid (ceil(N / 128), ceil(M / 128)), block (16, 16)."""
        m_dim, k_dim = x.shape
        n_dim = w.shape[1]
        xs = cuda.shared.array((BK, pitch), float32)  # x tile, transposed and padded: [BK, BM + PAD]
        ws = cuda.shared.array((BK, BN), float32)  # w tile: [BK, BN]
        acc = cuda.local.array((TM, TN), float32)
        x_next = cuda.local.array(PER, float32)
        w_next = cuda.local.array(PER, float32)
        xa = cuda.local.array(TM, float32)
        wa = cuda.local.array(TN, float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * SIDE + tx
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        for t in range(PER):  # the first tile: x by rows of 8 k (32 bytes), w by rows of 128 columns
            e = t * THREADS + tid
            mm, kk = e // BK, e % BK
            x_next[t] = x[m0 + mm, kk] if m0 + mm < m_dim and kk < k_dim else float32(0.0)
            kk, nn = e // BN, e % BN
            w_next[t] = w[kk, n0 + nn] if kk < k_dim and n0 + nn < n_dim else float32(0.0)
        for k0 in range(0, k_dim, BK):
            for t in range(PER):
                e = t * THREADS + tid
                xs[e % BK, e // BK] = x_next[t]
                ws[e // BN, e % BN] = w_next[t]
            cuda.syncthreads()
            k1 = k0 + BK
            if k1 < k_dim:  # the next tile, in flight while this one is summed
                for t in range(PER):
                    e = t * THREADS + tid
                    mm, kk = e // BK, k1 + e % BK
                    x_next[t] = x[m0 + mm, kk] if m0 + mm < m_dim and kk < k_dim else float32(0.0)
                    kk, nn = k1 + e // BN, e % BN
                    w_next[t] = w[kk, n0 + nn] if kk < k_dim and n0 + nn < n_dim else float32(0.0)
            for kk in range(min(BK, k_dim - k0)):  # only real k: a padded term is a term
                for i in range(TM):
                    xa[i] = xs[kk, ty + i * SIDE]
                for j in range(TN):
                    wa[j] = ws[kk, tx + j * SIDE]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] = cuda.fma(xa[i], wa[j], acc[i, j])
            cuda.syncthreads()
        for i in range(TM):
            m = m0 + ty + i * SIDE
            for j in range(TN):
                n = n0 + tx + j * SIDE
                if m < m_dim and n < n_dim:
                    out[m, n] = acc[i, j] + b[n]

    return gemm_prefetch
