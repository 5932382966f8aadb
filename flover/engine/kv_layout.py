"""KV layouts: where each request's keys and values live, and what a step computes for no one.

The engine asks a layout four things: can this request come in, which
blocks does it own, which idle lanes must a step compute besides the
requests' own, and what moves after an eviction. Two layouts:

- ``SlotLayout``: Flover's. One slot of n_ctx positions per request; a fused
  step runs over the window of slots from the first active to the last.
  With the shuffle, a hole left in the window by a departed request is
  filled by moving active slots in (``shuffle_plan``). Without it, the hole
  is still computed, as a fused kernel over the contiguous window would:
  the departed request's last lane again, attending over its last length.
  ``pad_batch`` computes every slot used since the layout was last empty,
  finished or not, which is dynamic batching's padding.
- ``PagedLayout``: vLLM's. Blocks of ``block_size`` positions from one pool,
  a block table per request, blocks taken as a request grows and returned
  when it leaves; nothing ever moves and nothing idle is computed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flover.engine.request import Request, RequestState
from flover.engine.shuffle import choose_slot, has_hole, shuffle_plan, window
from reference import GPTConfig, KVShape, Lane


class KVLayout(Protocol):
    shape: KVShape  # the KV memory a backend must have for this layout

    def check_fits(self, request: Request) -> None: ...  # ValueError if it could never run, even alone
    def can_admit(self, state: RequestState) -> bool: ...
    def admit(self, state: RequestState) -> None: ...
    def grow(self, state: RequestState, n: int) -> bool: ...  # memory for n more positions; False: none left
    def blocks(self, state: RequestState) -> np.ndarray: ...
    def release(self, state: RequestState) -> None: ...
    def idle_lanes(self) -> list[Lane]: ...  # computed with every decode step, for no request
    def compact(self) -> list[tuple[int, int, int]]: ...  # (source block, destination block, positions) moves
    def held_bytes(self) -> int: ...  # KV memory held by requests now


class SlotLayout:
    """Flover's fixed slots, with or without the memory shuffle."""

    def __init__(self, config: GPTConfig, n_slots: int, shuffle: bool = True, pad_batch: bool = False) -> None:
        self.shape = KVShape.slots(config, n_slots)
        self.shuffle = shuffle
        self.pad_batch = pad_batch
        self.slot_bytes = self.shape.block_bytes(config)
        self.slots: list[RequestState | None] = [None] * n_slots
        self.where: dict[int, int] = {}  # id(state) -> its slot
        self.last_lane: list[tuple[int, int] | None] = [None] * n_slots  # a departed request's (token, position)
        self.high_water = 0  # slots 0 .. high_water - 1 used since the layout was last empty

    @property
    def active(self) -> list[bool]:
        return [s is not None for s in self.slots]

    def check_fits(self, request: Request) -> None:
        """A slot holds the whole context, and the trace check keeps every request within it."""

    def can_admit(self, state: RequestState) -> bool:
        return None in self.slots

    def admit(self, state: RequestState) -> None:
        slot = choose_slot(self.active)
        self.slots[slot] = state
        self.where[id(state)] = slot
        self.last_lane[slot] = None
        self.high_water = max(self.high_water, slot + 1)

    def grow(self, state: RequestState, n: int) -> bool:
        return True  # a slot holds the whole context

    def blocks(self, state: RequestState) -> np.ndarray:
        return np.array([self.where[id(state)]])

    def release(self, state: RequestState) -> None:
        slot = self.where.pop(id(state))
        self.slots[slot] = None
        self.last_lane[slot] = (state.ids[state.cached - 1], state.cached - 1) if state.cached else (0, 0)
        if not any(self.active):
            self.high_water = 0

    def computed_span(self) -> tuple[int, int]:
        """The slots a step computes over: the window, or (padded batch) every slot used since empty."""
        first, last = window(self.active)
        return (0, self.high_water) if self.pad_batch and first < last else (first, last)

    def idle_lanes(self) -> list[Lane]:
        if self.shuffle and not self.pad_batch:
            return []
        first, last = self.computed_span()
        holes = [i for i in range(first, last) if self.slots[i] is None]
        return [Lane.of([i], [self.last_lane[i][0]], self.last_lane[i][1]) for i in holes if self.last_lane[i]]

    def compact(self) -> list[tuple[int, int, int]]:
        if not self.shuffle or not has_hole(self.active):
            return []
        moves = []
        for src, dst in shuffle_plan(self.active):
            state = self.slots[src]
            self.slots[dst], self.slots[src] = state, None
            self.where[id(state)] = dst
            self.last_lane[dst] = self.last_lane[src] = None
            moves.append((src, dst, state.cached))
        return moves

    def held_bytes(self) -> int:
        return sum(self.active) * self.slot_bytes


class PagedLayout:
    """vLLM-style paging: a pool of ``n_blocks`` blocks of ``block_size`` positions, a block table per request."""

    def __init__(self, config: GPTConfig, n_blocks: int, block_size: int = 16) -> None:
        self.shape = KVShape(n_blocks, block_size)
        self.block_bytes = self.shape.block_bytes(config)
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest id is taken first
        self.tables: dict[int, list[int]] = {}  # id(state) -> its blocks

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.shape.block_size)

    def check_fits(self, request: Request) -> None:
        prompt, total = len(request.prompt_ids), len(request.prompt_ids) + request.max_new_tokens - 1
        needed = max(self.blocks_for(prompt) + 1, self.blocks_for(total))
        if needed > self.shape.n_blocks:
            raise ValueError(f"request {request.id!r} needs {needed} blocks of {self.shape.block_size} positions "
                             f"({prompt} + {request.max_new_tokens} tokens), more than the pool's {self.shape.n_blocks}; "
                             f"raise --kv-memory")  # fmt: skip

    def can_admit(self, state: RequestState) -> bool:
        """Room for what it brings (its prompt, or all its ids after a preemption) plus one block to grow into."""
        return self.blocks_for(len(state.ids)) + 1 <= len(self.free)

    def admit(self, state: RequestState) -> None:
        self.tables[id(state)] = []
        if not self.grow(state, len(state.ids) - state.cached):
            raise RuntimeError("admitted a request the pool cannot hold; call can_admit first")

    def grow(self, state: RequestState, n: int) -> bool:
        table = self.tables[id(state)]
        needed = self.blocks_for(state.cached + n) - len(table)
        if needed > len(self.free):
            return False
        table.extend(self.free.pop() for _ in range(max(needed, 0)))
        return True

    def blocks(self, state: RequestState) -> np.ndarray:
        return np.array(self.tables[id(state)], np.int64)

    def release(self, state: RequestState) -> None:
        self.free.extend(reversed(self.tables.pop(id(state))))

    def idle_lanes(self) -> list[Lane]:
        return []

    def compact(self) -> list[tuple[int, int, int]]:
        return []

    def held_bytes(self) -> int:
        return (self.shape.n_blocks - len(self.free)) * self.block_bytes
