"""Clocks. Benchmarks replay arrivals in wall-clock time; tests use a virtual clock
whose time moves only by modelled costs, so every run is deterministic."""

from __future__ import annotations

import time
from collections.abc import Sequence

from reference import Lane

MAX_WAIT_S = 7 * 24 * 3600.0  # the longest a wall clock will sleep for an arrival


class WallClock:
    """Seconds since ``start`` (a ``time.perf_counter()`` reading, by default now); waiting sleeps.

    ``perf_counter`` is the system's monotonic clock on Linux, the same in
    every process, so instances in other processes can share a start.
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start

    def now(self) -> float:
        return time.perf_counter() - self.start

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > MAX_WAIT_S:
            raise ValueError(f"an arrival {t:g} s after the start is more than {MAX_WAIT_S:g} s away")
        if delay > 0:
            time.sleep(delay)

    def spend(self, lanes: Sequence[Lane], prefill: int) -> None:
        """Real work takes its real time."""

    def spend_move(self, lengths: Sequence[int]) -> None:
        """The memory shuffle's copies (positions of each moved slot) took their real time too."""


class VirtualClock:
    """Time that advances only when the engine waits or runs modelled work.

    A step costs ``prefill_s`` for each prefill lane in it (a prompt, a chunk
    of one, or a recomputation) and ``step_s`` if it decodes at all, whatever
    its batch: the idealised cost model of a memory-bound decode step.
    """

    def __init__(self, step_s: float = 1.0, prefill_s: float = 1.0, start: float = 0.0) -> None:
        self.step_s, self.prefill_s = step_s, prefill_s
        self._now = start

    def now(self) -> float:
        return self._now

    def wait_until(self, t: float) -> None:
        self._now = max(self._now, t)

    def spend(self, lanes: Sequence[Lane], prefill: int) -> None:
        self._now += prefill * self.prefill_s + (self.step_s if len(lanes) > prefill else 0.0)

    def spend_move(self, lengths: Sequence[int]) -> None:
        """The idealised model prices no copies (a cost model's clock does: ``flover.sim.clock``)."""

    def fork(self, start: float) -> VirtualClock:
        return VirtualClock(self.step_s, self.prefill_s, start)
