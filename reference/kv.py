"""The KV cache as fixed slots, one per concurrent request (Flover's layout)."""

from __future__ import annotations

import numpy as np

from reference.config import GPTConfig


class KVSlots:
    """K and V of every layer for ``n_slots`` requests, each slot holding n_ctx positions.

    k, v: [n_layer, n_slots, n_head, n_ctx, head_dim], allocated and written
    once up front, as a server preallocates its KV memory. (``np.zeros`` alone
    would be mapped lazily by the OS, and the first requests would then pay
    the page faults: on the gpt2 shape with 32 slots, 2.4 GB of them, which
    raised the first run's mean time to first token from 0.25 s to 1.1 s.)
    """

    def __init__(self, config: GPTConfig, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"the KV cache needs at least 1 slot, got {n_slots}")
        shape = (config.n_layer, n_slots, config.n_head, config.n_ctx, config.head_dim)
        self.k = np.full(shape, 0.0, np.float32)  # np.full writes every page now
        self.v = np.full(shape, 0.0, np.float32)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """Copy slot src[i] to slot dst[i] in every layer: the first lengths[i] positions, or all.

        Destinations must be free slots (holes), never a source of the same move.
        """
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        check_move(src, dst, self.n_slots)
        n_ctx = self.k.shape[3]
        for i, (s, d) in enumerate(zip(src, dst)):
            n = n_ctx if lengths is None else int(lengths[i])
            self.k[:, d, :, :n] = self.k[:, s, :, :n]
            self.v[:, d, :, :n] = self.v[:, s, :, :n]


def check_move(src: np.ndarray, dst: np.ndarray, n_slots: int) -> None:
    if src.shape != dst.shape:
        raise ValueError(f"move needs as many sources as destinations, got {src.shape} and {dst.shape}")
    for name, slots in (("source", src), ("destination", dst)):
        if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
            raise ValueError(f"{name} slot out of range 0..{n_slots - 1}: {slots.tolist()}")
    if len(set(dst.tolist())) != dst.size or set(src.tolist()) & set(dst.tolist()):
        raise ValueError(f"move destinations {dst.tolist()} must be distinct holes, not sources {src.tolist()}")
