"""Clocks. Benchmarks replay arrivals in wall-clock time; tests use a virtual clock
whose time moves only by modelled costs, so every run is deterministic."""

from __future__ import annotations

import time


class WallClock:
    """Seconds since the run started; waiting sleeps."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def spend(self, kind: str, n: int = 1) -> None:
        """Real work takes its real time."""


class VirtualClock:
    """Time that advances only when the engine waits or runs modelled work.

    A prefill costs ``prefill_s``, a decode step ``step_s`` whatever its batch:
    the idealised cost model of a memory-bound decode step.
    """

    def __init__(self, step_s: float = 1.0, prefill_s: float = 1.0, start: float = 0.0) -> None:
        self.step_s, self.prefill_s = step_s, prefill_s
        self._now = start

    def now(self) -> float:
        return self._now

    def wait_until(self, t: float) -> None:
        self._now = max(self._now, t)

    def spend(self, kind: str, n: int = 1) -> None:
        self._now += n * (self.prefill_s if kind == "prefill" else self.step_s)

    def fork(self, start: float) -> VirtualClock:
        return VirtualClock(self.step_s, self.prefill_s, start)
