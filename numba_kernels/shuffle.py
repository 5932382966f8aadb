"""The memory shuffle's copy: move whole requests between KV slots in one launch.

Flover's shuffle plan (which active slot goes into which hole) is made by the
engine; this kernel carries it out. Pair p copies slot src[p] into slot
dst[p]: the first lengths[p] positions of K and V in every layer and head,
and the slot's per-slot state (its cached length).

One version: the K (or V) of one (layer, slot, head) holds its positions
contiguously, [n_ctx, D] floats, so the used part of a pair is one run of
lengths[p] * D floats per (layer, head). The grid is (chunk of that run,
layer x head, pair); a block copies one chunk with consecutive threads on
consecutive floats (coalesced reads and writes). Blocks past a pair's length
exit at once. Destinations are holes, never sources of the same shuffle, so
the copies are independent and need no ordering.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from numba_kernels.grid import block_threads, cdiv
from reference.kv import check_move

THREADS = 256
CHUNK = 8 * THREADS  # floats per block


@cuda.jit
def move_slots_kernel(k, v, slot_lengths, src, dst, lengths, d_head):  # pragma: no cover - kernel
    """k, v [L, n_slots, H, n_ctx * D]; slot_lengths [n_slots]; src, dst, lengths [P]; grid (chunks, L * H, P)."""
    chunk, lh, p = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    n_head = k.shape[2]
    layer, h = lh // n_head, lh % n_head
    s, d = src[p], dst[p]
    start = chunk * CHUNK
    stop = min(start + CHUNK, lengths[p] * d_head)
    for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
        k[layer, d, h, i] = k[layer, s, h, i]
        v[layer, d, h, i] = v[layer, s, h, i]
    if chunk == 0 and lh == 0 and cuda.threadIdx.x == 0:
        slot_lengths[d] = slot_lengths[s]


def move_slots(k, v, slot_lengths, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, stream=0) -> None:
    """k, v [L, n_slots, H, n_ctx, D] on the device; src, dst, lengths [P] on the host."""
    plan = upload_plan(src, dst, lengths, k.shape[1], k.shape[3], stream)
    if plan is not None:
        launch_move(k, v, slot_lengths, plan, int(np.max(lengths)), stream)


def upload_plan(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, n_slots: int, n_ctx: int, stream=0):
    """Check a shuffle plan and copy it to the device as [3, P] int32 (src, dst, lengths); None if empty."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    check_move(src, dst, n_slots)
    lengths = np.asarray(lengths, np.int64)
    if lengths.shape != src.shape or (lengths.size and (lengths.min() < 0 or lengths.max() > n_ctx)):
        raise ValueError(f"move lengths must be one per pair, each in 0..{n_ctx}, got {lengths.tolist()}")
    if src.size == 0:
        return None
    return cuda.to_device(np.stack([src, dst, lengths]).astype(np.int32), stream=stream)


def launch_move(k, v, slot_lengths, plan, max_length: int, stream=0) -> None:
    """One launch for every pair of an uploaded plan; max_length: the longest pair's positions."""
    n_layer, n_slots, n_head, n_ctx, d_head = k.shape
    flat = (n_layer, n_slots, n_head, n_ctx * d_head)
    run = max_length * d_head  # the longest pair's floats per (layer, head)
    grid = (max(1, cdiv(run, CHUNK)), n_layer * n_head, plan.shape[1])
    move_slots_kernel[grid, block_threads(run, THREADS), stream](
        k.reshape(*flat), v.reshape(*flat), slot_lengths, plan[0], plan[1], plan[2], d_head
    )
