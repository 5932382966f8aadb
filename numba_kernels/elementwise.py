"""The small ops of a decode step, so activations stay on the device from embedding to logits.

Kernels, one version each:

- ``embed_kernel``: x[r] = wte[token[r]] + wpe[position[r]]; one thread per element.
- ``layer_norm_kernel`` (v1): one block per row; mean, then the mean of
  squared deviations, each a block sum that thread 0 adds up serially
  (``reduce.block_sum``: up to 256 dependent adds, twice).
- ``layer_norm_tree_kernel`` (v2, the one ``layer_norm`` launches): the same
  row pass, with each block sum a tree (``reduce.tree_sum``: log2(threads)
  levels). The order of every sum is fixed by the width and the block size,
  so a row's result does not depend on its batch; it differs from v1 in the
  last bits, as any two summation orders do.
- ``gelu_kernel``: GPT-2's tanh GELU ("gelu_new"); one thread per element.
- ``residual_add_kernel``: x += y. The biases of the linear layers are added
  in the GEMM epilogue (``gemm.py``), where they cost one read per output.
- ``take_rows_kernel``: out[i] = x[rows[i]]: the rows whose logits a step
  returns (each lane's last token).

Row r of an output reads row r of the inputs only, so none of these can mix
requests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from numba_kernels.grid import block_threads, cdiv
from numba_kernels.reduce import MAX_THREADS, block_sum, reduce_threads, tree_sum

THREADS = 128
GELU_C = np.float32(math.sqrt(2.0 / math.pi))


@cuda.jit
def embed_kernel(tokens, positions, wte, wpe, out):  # pragma: no cover - kernel
    """tokens, positions [B]; wte [V, C], wpe [n_ctx, C] -> out [B, C]; grid (ceil(C / threads), B)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y
    if i < out.shape[1]:
        out[r, i] = wte[tokens[r], i] + wpe[positions[r], i]


@cuda.jit
def layer_norm_kernel(x, g, b, eps, out):  # pragma: no cover - kernel
    """[B, C] -> [B, C], gain g and bias b [C]; one block per row."""
    r, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    c = x.shape[1]
    part = cuda.shared.array(MAX_THREADS, float32)
    total = float32(0.0)
    for i in range(tid, c, nt):
        total += x[r, i]
    mean = block_sum(part, total) / float32(c)
    total = float32(0.0)
    for i in range(tid, c, nt):
        d = x[r, i] - mean
        total = cuda.fma(d, d, total)
    inv = float32(1.0) / math.sqrt(block_sum(part, total) / float32(c) + float32(eps))
    for i in range(tid, c, nt):
        out[r, i] = g[i] * ((x[r, i] - mean) * inv) + b[i]


@cuda.jit
def layer_norm_tree_kernel(x, g, b, eps, out):  # pragma: no cover - kernel
    """v2: [B, C] -> [B, C], gain g and bias b [C]; one block per row, its size a power of two."""
    r, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    c = x.shape[1]
    part = cuda.shared.array(MAX_THREADS, float32)
    total = float32(0.0)
    for i in range(tid, c, nt):  # each thread folds its own strided elements, ascending
        total += x[r, i]
    part[tid] = total
    mean = tree_sum(part, nt) / float32(c)
    total = float32(0.0)
    for i in range(tid, c, nt):
        d = x[r, i] - mean
        total = cuda.fma(d, d, total)
    part[tid] = total
    inv = float32(1.0) / math.sqrt(tree_sum(part, nt) / float32(c) + float32(eps))
    for i in range(tid, c, nt):
        out[r, i] = g[i] * ((x[r, i] - mean) * inv) + b[i]


@cuda.jit(device=True)
def gelu_value(v):  # pragma: no cover - kernel
    """GPT-2's GELU of one float32; the GELU kernel and the c_fc epilogue (``epilogue.py``) share it."""
    return float32(0.5) * v * (float32(1.0) + math.tanh(GELU_C * (v + float32(0.044715) * v * v * v)))


@cuda.jit
def gelu_kernel(x, out):  # pragma: no cover - kernel
    """[B, N] -> [B, N]; grid (ceil(N / threads), B). ``out`` may be ``x``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y
    if i < x.shape[1]:
        out[r, i] = gelu_value(x[r, i])


@cuda.jit
def residual_add_kernel(x, y):  # pragma: no cover - kernel
    """x [B, C] += y [B, C]; grid (ceil(C / threads), B)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y
    if i < x.shape[1]:
        x[r, i] += y[r, i]


@cuda.jit
def take_rows_kernel(x, rows, out):  # pragma: no cover - kernel
    """x [B, C], rows [L] -> out [L, C]; grid (ceil(C / threads), L)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y
    if i < x.shape[1]:
        out[r, i] = x[rows[r], i]


def rows_grid(x) -> tuple[tuple[int, int], int]:
    """Grid and block for one thread per element of x [B, N]: blocks along N, one grid row per row of x."""
    threads = block_threads(x.shape[1], THREADS)
    return (cdiv(x.shape[1], threads), x.shape[0]), threads


def embed(tokens, positions, wte, wpe, out, stream=0):
    if out.shape[0]:
        grid, threads = rows_grid(out)
        embed_kernel[grid, threads, stream](tokens, positions, wte, wpe, out)
    return out


def layer_norm(x, g, b, eps: float, out, stream=0, kernel=None):
    """Layer norm of each row of x [B, C] into out; ``kernel`` is v2 unless given (v1 to compare)."""
    kernel = layer_norm_tree_kernel if kernel is None else kernel
    if x.shape[0]:
        kernel[x.shape[0], reduce_threads(x.shape[1]), stream](x, g, b, np.float32(eps), out)
    return out


def gelu(x, out, stream=0):
    if x.shape[0]:
        grid, threads = rows_grid(x)
        gelu_kernel[grid, threads, stream](x, out)
    return out


def residual_add(x, y, stream=0):
    if x.shape[0]:
        grid, threads = rows_grid(x)
        residual_add_kernel[grid, threads, stream](x, y)
    return x


def take_rows(x, rows, out, stream=0):
    """out[i] = x[rows[i]]: x [B, C], rows [L] on the device -> out [L, C]."""
    if out.shape[0]:
        grid, threads = rows_grid(out)
        take_rows_kernel[grid, threads, stream](x, rows, out)
    return out
