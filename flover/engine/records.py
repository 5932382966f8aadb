"""What the engine records about each step it runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Step:
    """One step: when it ran, how many requests it served, how many rows it computed and for whom.

    ``idle_rows`` are rows computed for no request: a hole of the slot layout
    without the shuffle, or a finished member carried as padding by dynamic
    batching. ``prefill_rows`` are the rows of prompt tokens (or recomputed
    ones) in the step.
    """

    start_s: float
    end_s: float
    batch: int  # requests whose tokens the step computed
    rows: int  # rows computed, idle ones included
    idle_rows: int = 0
    prefill_rows: int = 0
    kv_bytes: int = 0  # KV memory held by requests when the step ran


@dataclass(slots=True)
class EngineStats:
    steps: list[Step] = field(default_factory=list)
    moves: int = 0  # slot moves made by the memory shuffle
    preemptions: int = 0  # requests whose KV memory was taken back (paged layout)
    peak_kv_bytes: int = 0  # the most KV memory held by requests at once
