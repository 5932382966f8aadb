"""The seam between a scheduler and the math: a step is a list of lanes.

A lane is one request's new tokens (1 for a decode, a chunk for a prefill) at
their positions ``start .. start + n - 1`` in the request's KV blocks; a step
returns the logits of each lane's last new token. A prefill is one lane with
many tokens, a decode step many lanes with one, chunked prefill a mix.

``plan_rows`` is the one argument check every backend runs: it turns the
lanes into flat rows (token, position, lane) and a block table, or raises
ValueError naming the lane, the value and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reference.config import GPTConfig
from reference.kv import KVShape


@dataclass(frozen=True, slots=True)
class Lane:
    """One request's rows in a step."""

    blocks: np.ndarray  # [m] block ids: position p lives in blocks[p // block_size]
    tokens: np.ndarray  # [n] new token ids
    start: int  # position of tokens[0]; positions 0 .. start - 1 are already cached

    @classmethod
    def of(cls, blocks, tokens, start: int) -> Lane:
        return cls(np.atleast_1d(np.asarray(blocks, np.int64)), np.atleast_1d(np.asarray(tokens, np.int64)), int(start))

    @property
    def end(self) -> int:
        """Positions cached once the lane has run."""
        return self.start + len(self.tokens)


@dataclass(frozen=True, slots=True)
class Rows:
    """A step's lanes flattened to rows, the form every backend computes.

    N rows in lane order, L lanes, M = the most blocks of any lane.
    """

    tokens: np.ndarray  # [N]
    positions: np.ndarray  # [N]
    lane: np.ndarray  # [N] the lane of each row
    block_table: np.ndarray  # [L, M] each lane's blocks, -1 past its own
    last: np.ndarray  # [L] the row of each lane's last token
    block_size: int

    @property
    def lengths(self) -> np.ndarray:
        """[N] positions each row attends over (itself and every one before it)."""
        return self.positions + 1

    @property
    def blocks(self) -> np.ndarray:
        """[N] the block each row's K and V are written to."""
        return self.block_table[self.lane, self.positions // self.block_size]

    @property
    def offsets(self) -> np.ndarray:
        """[N] where in its block each row's K and V go."""
        return self.positions % self.block_size


def plan_rows(config: GPTConfig, kv: KVShape, lanes: Sequence[Lane]) -> Rows:
    """Check a step's lanes against the model and the KV memory; -> their rows."""
    if len(lanes) == 0:
        raise ValueError("a step needs at least 1 lane")
    seen: set[int] = set()
    for i, lane in enumerate(lanes):
        n, where = len(lane.tokens), f"lane {i}"
        if lane.tokens.ndim != 1 or n == 0:
            raise ValueError(f"{where}: needs at least 1 new token, got {n}")
        bad = lane.tokens[(lane.tokens < 0) | (lane.tokens >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"{where}: token id {int(bad[0])} is outside the vocabulary 0..{config.vocab_size - 1}")
        if lane.start < 0 or lane.end > config.n_ctx:
            raise ValueError(f"{where}: positions {lane.start}..{lane.end - 1} must lie in 0..{config.n_ctx - 1} (n_ctx)")
        needed = -(-lane.end // kv.block_size)
        if len(lane.blocks) < needed:
            raise ValueError(f"{where}: positions up to {lane.end - 1} need {needed} blocks of {kv.block_size}, "
                             f"it has {len(lane.blocks)}")  # fmt: skip
        own = lane.blocks[:needed]
        if own.min() < 0 or own.max() >= kv.n_blocks:
            raise ValueError(f"{where}: block out of range 0..{kv.n_blocks - 1}: {own.tolist()}")
        if len(set(own.tolist())) != needed or seen & set(own.tolist()):
            raise ValueError(f"{where}: blocks {own.tolist()} are used twice in one step")
        seen |= set(own.tolist())
    sizes = np.array([len(lane.tokens) for lane in lanes])
    width = max(-(-lane.end // kv.block_size) for lane in lanes)
    table = np.full((len(lanes), width), -1, np.int64)
    for i, lane in enumerate(lanes):
        m = min(width, len(lane.blocks))
        table[i, :m] = lane.blocks[:m]
    return Rows(
        tokens=np.concatenate([lane.tokens for lane in lanes]),
        positions=np.concatenate([np.arange(lane.start, lane.end) for lane in lanes]),
        lane=np.repeat(np.arange(len(lanes)), sizes),
        block_table=table,
        last=np.cumsum(sizes) - 1,
        block_size=kv.block_size,
    )
