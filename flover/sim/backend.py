"""A backend without the math: the Backend protocol over bookkeeping only.

It holds no weights and no K or V. What it keeps in their place is one
number per KV position: a rolling hash of the request's tokens up to and
including that position. A lane extends the hash from the one cached before
its start, writes each new position's hash where its K and V would go, and
returns logits that are one-hot at ``hash % vocab_size`` for its last token.

So a request's stream is a function of its own tokens, as in a real greedy
run, and is the same under any schedule: alone or fused, prefilled at once
or in chunks, its slot moved by the shuffle, its blocks taken back and
recomputed, or its last lane computed again as a hole. Stop ids end a stream
where they happen to come up, as they would in a real run. The one-hot is
``HOT`` high, so a sampled request (any temperature, top-k, top-p) draws the
same token too: its generator still makes its one draw per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reference import GPTConfig, KVShape, Lane, plan_rows
from reference.backend import LaneBackend
from reference.kv import as_kv_shape

HOT = 1e4  # exp(-HOT / temperature) is 0 in float64 for any temperature up to 10
SEED = 0x5EED
MASK = 2**64 - 1


def extend(h: int, token: int) -> int:
    """The rolling hash one token on: FNV-1a's step, then splitmix64's finaliser to spread the bits."""
    z = ((h ^ token) * 0x100000001B3) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def stream(prompt: Sequence[int], n: int, vocab_size: int) -> list[int]:
    """The ``n`` greedy tokens a request with ``prompt`` gets from this backend, computed directly."""
    h, out = SEED, []
    for token in prompt:
        h = extend(h, int(token))
    for _ in range(n):
        out.append(h % vocab_size)
        h = extend(h, out[-1])
    return out


class ModelFreeBackend(LaneBackend):
    """``config`` gives the vocabulary and context; ``kv`` the blocks (an int: that many full-context slots)."""

    def __init__(self, config: GPTConfig, kv: int | KVShape = 1) -> None:
        self.config = config
        self.kv = as_kv_shape(config, kv)
        self.prefix = np.zeros((self.kv.n_blocks, self.kv.block_size), np.uint64)  # [blocks, positions]: hashes

    def step(self, lanes: Sequence[Lane]) -> np.ndarray:
        plan_rows(self.config, self.kv, lanes)  # the same checks as a backend with the math
        size, vocab = self.kv.block_size, self.config.vocab_size
        logits = np.zeros((len(lanes), vocab), np.float32)  # [L, V]
        for i, lane in enumerate(lanes):
            p = lane.start - 1
            h = SEED if p < 0 else int(self.prefix[lane.blocks[p // size], p % size])
            hashes = []
            for token in lane.tokens.tolist():
                h = extend(h, token)
                hashes.append(h)
            positions = np.arange(lane.start, lane.end)
            self.prefix[lane.blocks[positions // size], positions % size] = np.array(hashes, np.uint64)
            logits[i, h % vocab] = HOT
        return logits

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        src, dst, lengths = (np.asarray(a, np.int64) for a in (src, dst, lengths))
        self.check_move(src, dst, lengths)
        for s, d, n in zip(src.tolist(), dst.tolist(), lengths.tolist()):
            self.prefix[d, :n] = self.prefix[s, :n]


class ModelFreeFactory:
    """Fresh model-free backends of one shape for any KV memory (what ``run_policy`` calls ``make_backend``)."""

    def __init__(self, config: GPTConfig) -> None:
        self.config = config

    def __call__(self, kv: int | KVShape) -> ModelFreeBackend:
        return ModelFreeBackend(self.config, kv)
