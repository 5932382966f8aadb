"""GEMM for every linear layer: out[M, N] = x[M, K] @ w[K, N] + b[N].

Versions, to be read side by side (as in llm.c ``dev/cuda``):

1. ``naive``: one thread per output element; it walks K reading x and w from
   global memory. The baseline every other version must equal.
2. ``tiled``: a block computes a BM x BN tile of the output. Tiles of x and w,
   BK deep, are staged in shared memory, and each thread keeps a TM x TN patch
   of outputs in registers (register blocking), so each value loaded from
   shared memory feeds several multiply-adds. For prefill and big batches.
3. ``gemv``: for few rows (the decode step). Each thread owns one output column
   and up to ROWS rows; it walks K reading its column of w, coalesced across
   the warp, while the rows of x come through shared memory in chunks of K.
   The weights, the bulk of the bytes, are read once per ROWS rows.
4. ``staged`` (``gemm_staged.py``): the GEMV again, with loading apart from
   summing: a block stages chunks of a strip of BN columns of w in shared
   memory, all its threads loading coalesced while one thread per output sums
   the previous chunk; enough blocks for every SM at N = 768, and the
   epilogue fused (residual add, GELU, K/V store: ``epilogue.py``).
5. ``prefetch`` (``gemm_prefetch.py``): version 2 again for prefill, with the
   x tile padded in shared memory (no bank conflicts), 8 x 8 outputs a
   thread, and the next tile loaded into registers while this one is summed.

One rule makes them interchangeable: every output element is summed by one
thread, over k ascending, with ``cuda.fma``, and the bias comes last. No
split-K, no warp reductions. So the versions are bitwise equal for every tile
size, ``dispatch.py`` can never change a result, and a request's row does not
depend on the rows that share its launch (batch invariance by construction).
(The simulator's ``cuda.fma`` rounds twice, a GPU's once; every version uses
it, so they agree on either.)

The price of the rule: a launch has at most N x M threads summing, each a
chain of K dependent FMAs. Version 3 also leaves them few loads in flight
(12 blocks at N = 768), so a narrow layer at batch 1 cannot keep a large
GPU's memory busy; version 4 stages enough bytes in flight, and what stays
is the chain (``roofline.py`` estimates both; ``numba_kernels.inspect``
prints them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from numba import cuda, float32

from numba_kernels.gemm_prefetch import BM as PREFETCH_BM
from numba_kernels.gemm_prefetch import SIDE as PREFETCH_SIDE
from numba_kernels.gemm_prefetch import prefetch_kernel
from numba_kernels.gemm_staged import staged_kernel
from numba_kernels.grid import cdiv

NAIVE_THREADS = 128
GEMV_K_CHUNK = 256  # columns of x staged in shared memory at a time: ROWS x 256 floats


@dataclass(frozen=True, slots=True)
class Variant:
    """A GEMM version and its launch parameters.

    naive: (threads,); tiled: (BM, BN, BK, TM, TN); gemv: (threads, ROWS); staged: (threads, BN, ROWS, KC);
    prefetch: ().
    """

    kernel: str
    params: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.kernel} {'x'.join(map(str, self.params))}"


TILES = ((32, 32, 16, 4, 4), (64, 64, 16, 4, 4), (64, 64, 8, 4, 4), (64, 64, 16, 8, 8), (128, 64, 8, 8, 4),
         (128, 128, 8, 8, 8), (16, 16, 16, 1, 1))  # fmt: skip
GEMV_PARAMS = ((32, 1), (64, 1), (64, 2), (64, 4), (64, 8), (128, 1), (128, 4), (128, 8), (256, 1))
STAGED_PARAMS = ((128, 8, 1, 512), (128, 8, 2, 512), (128, 8, 4, 256), (128, 8, 8, 256), (128, 4, 1, 512),
                 (256, 8, 1, 512), (128, 16, 1, 256), (128, 16, 8, 128))  # fmt: skip
PREFETCH_PARAMS = ((),)  # one tile shape: 128 x 128, BK 8, 8 x 8 a thread
FUSING = ("staged",)  # the versions that run an epilogue (epilogue.py) in the same launch


def candidates() -> list[Variant]:
    """Every variant ``numba_kernels.tune`` times for a shape."""
    found = [Variant("naive", (NAIVE_THREADS,))]
    found += [Variant("tiled", tile) for tile in TILES]
    found += [Variant("gemv", p) for p in GEMV_PARAMS]
    found += [Variant("staged", p) for p in STAGED_PARAMS]
    found += [Variant("prefetch", p) for p in PREFETCH_PARAMS]
    return found


# ---------------------------------------------------------------- 1. naive


@cuda.jit
def gemm_naive(x, w, b, out):  # pragma: no cover - kernel
    """[M, K] @ [K, N] + [N] -> [M, N]; grid (ceil(N / threads), M)."""
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    m = cuda.blockIdx.y
    if n < out.shape[1]:
        acc = float32(0.0)
        for k in range(x.shape[1]):
            acc = cuda.fma(x[m, k], w[k, n], acc)
        out[m, n] = acc + b[n]


# ---------------------------------------------------------------- 2. tiled


@functools.cache
def tiled_kernel(bm: int, bn: int, bk: int, tm: int, tn: int):
    """The tiled kernel compiled for one tile shape (shared and local sizes are compile-time)."""
    threads_y, threads_x = bm // tm, bn // tn
    n_threads = threads_x * threads_y

    @cuda.jit
    def gemm_tiled(x, w, b, out):  # pragma: no cover - kernel
        """[M, K] @ [K, N] + [N] -> [M, N]; grid (ceil(N / BN), ceil(M / BM)), block (BN/TN, BM/TM)."""
        m_dim, k_dim = x.shape
        n_dim = w.shape[1]
        xs = cuda.shared.array((bk, bm), float32)  # x tile, transposed: [BK, BM]
        ws = cuda.shared.array((bk, bn), float32)  # w tile: [BK, BN]
        acc = cuda.local.array((tm, tn), float32)  # this thread's outputs, in registers
        xa = cuda.local.array(tm, float32)
        wa = cuda.local.array(tn, float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * threads_x + tx
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = float32(0.0)
        for k0 in range(0, k_dim, bk):
            for e in range(tid, bm * bk, n_threads):  # consecutive threads read consecutive k
                mm, kk = e // bk, e % bk
                if m0 + mm < m_dim and k0 + kk < k_dim:
                    xs[kk, mm] = x[m0 + mm, k0 + kk]
                else:
                    xs[kk, mm] = float32(0.0)
            for e in range(tid, bk * bn, n_threads):  # consecutive threads read consecutive n
                kk, nn = e // bn, e % bn
                if k0 + kk < k_dim and n0 + nn < n_dim:
                    ws[kk, nn] = w[k0 + kk, n0 + nn]
                else:
                    ws[kk, nn] = float32(0.0)
            cuda.syncthreads()
            live = m0 + ty < m_dim and n0 + tx < n_dim  # a thread past the edge only helps load
            for kk in range(min(bk, k_dim - k0) if live else 0):  # only real k: a padded term is a term
                for i in range(tm):
                    xa[i] = xs[kk, ty + i * threads_y]
                for j in range(tn):
                    wa[j] = ws[kk, tx + j * threads_x]  # strided columns: no shared-memory bank conflicts
                for i in range(tm):
                    for j in range(tn):
                        acc[i, j] = cuda.fma(xa[i], wa[j], acc[i, j])
            cuda.syncthreads()
        for i in range(tm):
            m = m0 + ty + i * threads_y
            for j in range(tn):
                n = n0 + tx + j * threads_x
                if m < m_dim and n < n_dim:
                    out[m, n] = acc[i, j] + b[n]

    return gemm_tiled


# ---------------------------------------------------------------- 3. gemv


@functools.cache
def gemv_kernel(rows: int):
    """The GEMV kernel compiled for ``rows`` rows per thread."""

    @cuda.jit
    def gemm_gemv(x, w, b, out):  # pragma: no cover - kernel
        """[M, K] @ [K, N] + [N] -> [M, N]; grid (ceil(N / threads), ceil(M / ROWS))."""
        m_dim, k_dim = x.shape
        n_dim = w.shape[1]
        xs = cuda.shared.array((rows, GEMV_K_CHUNK), float32)  # [ROWS, K chunk] of x
        acc = cuda.local.array(rows, float32)
        tid = cuda.threadIdx.x
        n = cuda.blockIdx.x * cuda.blockDim.x + tid
        m0 = cuda.blockIdx.y * rows
        n_rows = min(rows, m_dim - m0)
        for r in range(rows):
            acc[r] = float32(0.0)
        for k0 in range(0, k_dim, GEMV_K_CHUNK):
            k_len = min(GEMV_K_CHUNK, k_dim - k0)
            for e in range(tid, rows * GEMV_K_CHUNK, cuda.blockDim.x):
                r, kk = e // GEMV_K_CHUNK, e % GEMV_K_CHUNK
                if r < n_rows and kk < k_len:
                    xs[r, kk] = x[m0 + r, k0 + kk]
                else:
                    xs[r, kk] = float32(0.0)  # rows past M are summed but never stored
            cuda.syncthreads()
            if n < n_dim:
                for kk in range(k_len):
                    wv = w[k0 + kk, n]  # one read of the weight serves every row
                    for r in range(rows):  # no branch in the hot loop
                        acc[r] = cuda.fma(xs[r, kk], wv, acc[r])
            cuda.syncthreads()
        if n < n_dim:
            for r in range(rows):  # a constant trip count keeps acc in registers
                if r < n_rows:
                    out[m0 + r, n] = acc[r] + b[n]

    return gemm_gemv


# ---------------------------------------------------------------- launch


def launch(variant: Variant, x, w, b, out, stream=0, epilogue: str = "bias", aux=()) -> None:
    """out[M, N] = x[M, K] @ w[K, N] + b[N] on the device, with the given variant (and, if it fuses, epilogue)."""
    (m, k), n = x.shape, w.shape[1]
    if w.shape[0] != k or b.shape != (n,) or out.shape != (m, n):
        raise ValueError(f"gemm shapes do not fit: x {x.shape}, w {w.shape}, b {b.shape}, out {out.shape}")
    if epilogue != "bias" and variant.kernel not in FUSING:
        raise ValueError(f"{variant} runs no epilogue; {epilogue!r} needs one of {', '.join(FUSING)}")
    if m == 0 or n == 0:
        return
    p = variant.params
    if variant.kernel == "naive":
        gemm_naive[(cdiv(n, p[0]), m), p[0], stream](x, w, b, out)
    elif variant.kernel == "tiled":
        bm, bn, bk, tm, tn = p
        if bm % tm or bn % tn or (bm // tm) * (bn // tn) > 1024:
            raise ValueError(f"tile {variant}: TM must divide BM, TN divide BN, and (BM/TM)(BN/TN) <= 1024 threads")
        tiled_kernel(*p)[(cdiv(n, bn), cdiv(m, bm)), (bn // tn, bm // tm), stream](x, w, b, out)
    elif variant.kernel == "gemv":
        threads, rows = p
        gemv_kernel(rows)[(cdiv(n, threads), cdiv(m, rows)), threads, stream](x, w, b, out)
    elif variant.kernel == "staged":
        threads, bn, rows, kc = p
        kernel = staged_kernel(threads, bn, rows, kc, epilogue)
        kernel[(cdiv(n, bn), cdiv(m, rows)), threads, stream](x, w, b, out, aux)
    elif variant.kernel == "prefetch":
        prefetch_kernel()[(cdiv(n, PREFETCH_BM), cdiv(m, PREFETCH_BM)), (PREFETCH_SIDE, PREFETCH_SIDE), stream](x, w, b, out)
    else:
        raise ValueError(f"unknown gemm kernel {variant.kernel!r}; choose naive, tiled, gemv, staged or prefetch")
