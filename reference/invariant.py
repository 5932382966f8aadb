"""Batch-invariant kernels for the fused decode step (Numba, CPU).

Why these exist: a request's logits must not depend on which other requests
share its decode step. NumPy's BLAS breaks that. A 1-row matmul goes to GEMV,
which sums K in another order than the GEMM that a 32-row batch gets, and a
GEMM's blocking may depend on M; NumPy's SIMD reductions and transcendental
functions treat an element differently in the vector body and the tail.

So every kernel here computes one request's row with a loop whose order is
fixed by the row's own sizes (K, n_embd, head_dim, the request's own length)
and never by the batch: an output element of a matmul starts at 0, adds its K
products one after another in ascending k, each with one fused multiply-add
(an explicit ``fma``, so no compiler flag decides where a product is
rounded), then adds the bias, in one thread; batch rows are only an outer
loop. The result is bitwise equal whether a request decodes alone or beside
63 others, by construction, and ``tests/test_invariant_kernels.py`` checks it.

Speed without breaking that rule (``matmul_rows``):

- Parallelism splits the *output columns* into tiles of ``TILE_N`` over
  threads; an element is still summed by one thread.
- SIMD runs across output columns: 16 neighbouring columns (one 512-bit
  vector) are 16 separate sums advanced in lockstep, which reorders nothing.
- Register blocking: a micro-kernel computes a block of ``TILE_ROWS`` rows by
  ``TILE_N`` columns with its accumulators on the stack, which LLVM keeps in
  16 vector registers for the whole K loop; each weight vector loaded serves
  ``TILE_ROWS`` rows. The rows left over (B mod TILE_ROWS, all of them when
  a request decodes alone) go through a one-row copy of the micro-kernel:
  the same FMAs in the same order, without the wasted work of zero rows.
- The weight is packed once (``pack_weight``) into column tiles
  [N / TILE_N, K, TILE_N], so the micro-kernel reads one contiguous,
  64-byte aligned stream.

The vector width and ``TILE_ROWS`` depend on the CPU (see
``use_512_bit_vectors``) and change the speed only: an element's sum is the
same sequence of FMAs in any case.

What never happens: ``fastmath`` beyond ``contract`` (which only fuses a
multiply and an add into one FMA, in the element-wise kernels), a split of
K, or an order of operations chosen by the batch size or a row's index.

The kernels release the GIL (``nogil``), so a server's event loop or
another engine thread keeps running while a step computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.core.registry import cpu_target
from numba.extending import intrinsic


def use_512_bit_vectors() -> bool:
    """Let LLVM use 512-bit vectors on an AVX-512 CPU, where its tuning prefers 256-bit ones.

    Numba fixes its CPU features for the whole process when it first compiles,
    so this takes effect only if this module is imported before any Numba CPU
    code is compiled; NUMBA_CPU_NAME and NUMBA_CPU_FEATURES, when set, win.
    Returns whether 512-bit vectors are in effect. The width changes speed,
    never results: lanes are separate sums.
    """
    if numba.config.CPU_NAME is None and numba.config.CPU_FEATURES is None:
        host = get_host_cpu_features()
        if "+avx512f" in host.split(","):
            numba.config.CPU_FEATURES = host + ",-prefer-256-bit"
    features = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    return "+avx512f" in features and "-prefer-256-bit" in features


WIDE_VECTORS = use_512_bit_vectors()
TILE_N = 64  # output columns per tile; below 64 LLVM unrolls the column loop instead of vectorising it
TILE_ROWS = 4 if WIDE_VECTORS else 2  # 16 vector accumulators: 4 rows x 4 zmm, or 2 rows x 8 ymm
TILE_SIZE = TILE_ROWS * TILE_N  # a constant, so the accumulators can live on the stack
ALIGN = 64  # bytes: a cache line, so a 16-float vector load never straddles two


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [K, N] weight as ``tiles`` [ceil(N / TILE_N), K, TILE_N]: tile t holds columns
    t*TILE_N ... t*TILE_N + TILE_N - 1, zero-padded past N."""

    tiles: np.ndarray
    n_out: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.tiles.shape[1], self.n_out


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array whose data starts on an ``ALIGN``-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def pack_weight(w: np.ndarray) -> PackedWeight:
    """[K, N] -> column tiles [ceil(N / TILE_N), K, TILE_N], done once per weight."""
    k_dim, n_out = w.shape
    n_tiles = -(-n_out // TILE_N)
    padded = np.zeros((k_dim, n_tiles * TILE_N), np.float32)  # [K, N_pad]
    padded[:, :n_out] = w
    tiles = aligned_empty((n_tiles, k_dim, TILE_N))
    tiles[...] = padded.reshape(k_dim, n_tiles, TILE_N).transpose(1, 0, 2)
    return PackedWeight(tiles, n_out)


def matmul_rows(x: np.ndarray, w: np.ndarray | PackedWeight, b: np.ndarray) -> np.ndarray:
    """[B, K] @ [K, N] + [N] -> [B, N], each element summed over ascending k.

    ``w`` is a packed weight, or a plain [K, N] array: read in place when N is
    a multiple of TILE_N (the same bits, but each tile's rows lie N apart, so
    it is slower at large batches), else packed for this call. The result is
    a view into a [B, N_pad] array.
    """
    x = np.ascontiguousarray(x, np.float32)
    n_rows, k_dim = x.shape
    if k_dim != w.shape[0]:
        raise ValueError(f"matmul of [{n_rows}, {k_dim}] by a weight of shape {w.shape}")
    if isinstance(w, PackedWeight):
        tiles, n_out, packed = w.tiles, w.n_out, True  # [n_tiles, K, TILE_N]
    elif w.shape[1] % TILE_N == 0:
        n_out, packed = w.shape[1], False
        tiles = np.ascontiguousarray(w, np.float32).reshape(k_dim, n_out // TILE_N, TILE_N)  # [K, n_tiles, TILE_N]
    else:
        return matmul_rows(x, pack_weight(w), b)
    b_pad = np.zeros(-(-n_out // TILE_N) * TILE_N, np.float32)  # [N_pad]
    b_pad[:n_out] = b
    return matmul_tiles(x, tiles, packed, b_pad)[:, :n_out]


@intrinsic
def stack_empty(typingctx, size, dtype):
    """A pointer to ``size`` uninitialised elements on the stack (size a compile-time constant).

    Unlike a NumPy array, stack memory is known to alias nothing else, so once
    the loops over it are unrolled LLVM keeps its elements in registers.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        n = context.get_constant(types.intp, size.literal_value)
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=n)

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with a single rounding (LLVM's llvm.fma), for floats of one type; it vectorises."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@njit(error_model="numpy", inline="always", cache=True)
def tile_row(tiles, packed, tile, k):  # pragma: no cover - compiled
    """Row k of column tile ``tile``, [TILE_N], from packed [n_tiles, K, TILE_N] or plain [K, n_tiles, TILE_N]."""
    return tiles[tile, k] if packed else tiles[k, tile]


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def matmul_tiles(x, tiles, packed, b):  # pragma: no cover - compiled
    """[B, K] @ tiles + [N_pad] -> [B, N_pad], with ``tiles`` as ``tile_row`` reads them.

    The loops over ``r`` and ``j`` have constant trip counts: LLVM vectorises
    ``j`` (4 vectors of 16 floats, or 8 of 8), unrolls ``r``, and keeps ``acc``
    in 16 vector registers across the whole ``k`` loop; each step of ``k``
    loads one row of the tile and does 16 vector FMAs (see ``inspect_asm``).
    """
    n_rows, k_dim = x.shape
    n_tiles = tiles.shape[0] if packed else tiles.shape[1]
    n_blocked = n_rows - n_rows % TILE_ROWS  # rows that fill whole blocks
    out = np.empty((n_rows, n_tiles * TILE_N), np.float32)
    for tile in prange(n_tiles):
        bias = b[tile * TILE_N : (tile + 1) * TILE_N]  # [TILE_N]
        acc = carray(stack_empty(TILE_SIZE, np.float32), (TILE_ROWS, TILE_N))
        for r0 in range(0, n_blocked, TILE_ROWS):  # micro-kernel: TILE_ROWS rows x TILE_N columns
            acc[:] = 0.0
            for k in range(k_dim):
                wk = tile_row(tiles, packed, tile, k)  # [TILE_N]
                for r in range(TILE_ROWS):
                    xv = x[r0 + r, k]
                    for j in range(TILE_N):
                        acc[r, j] = fma(xv, wk[j], acc[r, j])
            for r in range(TILE_ROWS):
                row = out[r0 + r, tile * TILE_N : (tile + 1) * TILE_N]  # [TILE_N]
                for j in range(TILE_N):
                    row[j] = acc[r, j] + bias[j]
        for r in range(n_blocked, n_rows):  # the same for one row: 1 x TILE_N columns
            acc[0, :] = 0.0
            for k in range(k_dim):
                wk = tile_row(tiles, packed, tile, k)
                xv = x[r, k]
                for j in range(TILE_N):
                    acc[0, j] = fma(xv, wk[j], acc[0, j])
            row = out[r, tile * TILE_N : (tile + 1) * TILE_N]
            for j in range(TILE_N):
                row[j] = acc[0, j] + bias[j]
    return out


@njit(fastmath={"contract"}, nogil=True, error_model="numpy", cache=True)
def layer_norm_rows(x, g, b, eps):  # pragma: no cover - compiled
    """Row-wise layer norm: [B, C] -> [B, C], sums taken in ascending order."""
    n_rows, c = x.shape
    out = np.empty_like(x)
    for r in range(n_rows):
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


@njit(fastmath={"contract"}, error_model="numpy", inline="always", cache=True)
def tanh_f32(v):  # pragma: no cover - compiled
    """tanh as a ratio of two polynomials in v (Eigen's float tanh), within 5 float32 ulps.

    Plain arithmetic, so a loop over it vectorises; ``math.tanh`` is a libm call per element.
    """
    x = min(max(v, np.float32(-9.0)), np.float32(9.0))  # beyond +-9, float32 tanh is +-1, and so is this
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(fastmath={"contract"}, nogil=True, error_model="numpy", cache=True)
def gelu_rows(x):  # pragma: no cover - compiled
    """GPT-2's tanh GELU, element by element: [B, D] -> [B, D]."""
    n_rows, d = x.shape
    out = np.empty_like(x)
    c = np.float32(math.sqrt(2.0 / math.pi))
    for r in range(n_rows):
        xr, yr = x[r], out[r]  # [D]
        for i in range(d):
            v = xr[i]
            yr[i] = np.float32(0.5) * v * (np.float32(1.0) + tanh_f32(c * (v + np.float32(0.044715) * v * v * v)))
    return out


def decode_attention(q, k_cache, v_cache, slots, lengths):
    """Slot-layout decode attention (one query per request, each in its own slot): [B, H, D] -> [B, H, D].

    k_cache, v_cache: [n_slots, H, n_ctx, D]; ``attention_rows`` with one block per row.
    """
    slots = np.asarray(slots, np.int64)
    return attention_rows(q, k_cache, v_cache, slots[:, None], np.arange(len(slots)), np.asarray(lengths, np.int64))


@njit(parallel=True, nogil=True, error_model="numpy", cache=True)
def attention_rows(q, k_cache, v_cache, block_table, lane, lengths):  # pragma: no cover - compiled
    """Each row's query over its own lane's cached positions, read through the lane's block table.

    q: [N, H, D]; k_cache, v_cache: [n_blocks, H, block_size, D];
    block_table: [L, M]; row r belongs to lane ``lane[r]`` and reads its
    positions ``0 .. lengths[r]-1`` (position p in block
    ``block_table[lane[r], p // block_size]``) and nothing else. -> [N, H, D]

    A score sums head_dim products in ascending order, one ``fma`` each; the
    softmax and the weighted sum of values run over positions in ascending
    order, whatever the block size. Four positions' scores are computed side
    by side, as four independent sums, and the rest of a block one by one,
    with the same FMAs. So a row's result depends only on its own query,
    length and cached K and V: not on the other rows, the block size, or
    where its blocks lie. A prefill's rows are causal by their lengths, and
    bitwise the rows its tokens would give fed one at a time.
    """
    n_rows, n_head, head_dim = q.shape
    block_size = k_cache.shape[2]
    out = np.empty_like(q)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for task in prange(n_rows * n_head):
        r = task // n_head
        h = task % n_head
        n = lengths[r]
        blocks = block_table[lane[r]]  # [M]
        qh, oh = q[r, h], out[r, h]  # [D]
        scores = np.empty(n, np.float32)
        for b in range((n + block_size - 1) // block_size):
            keys = k_cache[blocks[b], h]  # [block_size, D]
            t0 = b * block_size
            m = min(block_size, n - t0)
            m4 = m - m % 4
            for t in range(0, m4, 4):
                k0, k1, k2, k3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]  # [D] each
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for d in range(head_dim):
                    s0 = fma(qh[d], k0[d], s0)
                    s1 = fma(qh[d], k1[d], s1)
                    s2 = fma(qh[d], k2[d], s2)
                    s3 = fma(qh[d], k3[d], s3)
                scores[t0 + t], scores[t0 + t + 1], scores[t0 + t + 2], scores[t0 + t + 3] = s0, s1, s2, s3
            for t in range(m4, m):
                s = np.float32(0.0)
                for d in range(head_dim):
                    s = fma(qh[d], keys[t, d], s)
                scores[t0 + t] = s
        best = np.float32(-np.inf)
        for t in range(n):
            scores[t] *= scale
            best = max(best, scores[t])
        denom = np.float32(0.0)
        for t in range(n):
            scores[t] = math.exp(scores[t] - best)
            denom += scores[t]
        oh[:] = 0.0
        for b in range((n + block_size - 1) // block_size):
            values = v_cache[blocks[b], h]  # [block_size, D]
            t0 = b * block_size
            for t in range(min(block_size, n - t0)):
                p, vt = scores[t0 + t], values[t]  # [D]
                for d in range(head_dim):
                    oh[d] = fma(p, vt[d], oh[d])
        for d in range(head_dim):
            oh[d] /= denom
    return out
