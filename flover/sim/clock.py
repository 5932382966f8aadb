"""The cost-model clock: virtual time that a step advances by what the cost model says it costs.

It is a ``VirtualClock``, so everything that runs on virtual time (the one
engine loop, instances simulated on forked clocks) runs on it unchanged.
``share`` tells it how many instances are busy on the device at a moment
(``flover.sim.instances``); alone, it is 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flover.clock import VirtualClock
from flover.sim.cost import CostModel
from reference import Lane


class CostClock(VirtualClock):
    def __init__(self, cost: CostModel, start: float = 0.0, share: Callable[[float], int] | None = None) -> None:
        super().__init__(start=start)
        self.cost = cost
        self.share = share
        self.busy_s = 0.0  # time spent in steps and moves, as against waiting for arrivals

    def spend(self, lanes: Sequence[Lane], prefill: int) -> None:
        spent = self.cost.step_s(lanes, self.share(self._now) if self.share else 1)
        self._now += spent
        self.busy_s += spent

    def spend_move(self, lengths: Sequence[int]) -> None:
        spent = self.cost.move_s(lengths)
        self._now += spent
        self.busy_s += spent

    def fork(self, start: float) -> CostClock:
        return CostClock(self.cost, start, self.share)
