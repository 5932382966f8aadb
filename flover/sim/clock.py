"""The cost-model clock: virtual time that a step advances by what the cost model says it costs.

It is a ``VirtualClock``, so everything that runs on virtual time (the one
engine loop, instances simulated on forked clocks) runs on it unchanged.
Concurrent instances on one device (``flover.sim.instances``) give it a
``pricing``: at a moment, the cost model a step runs at and its share of the
device's memory and math, from how many instances are busy then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flover.clock import VirtualClock
from flover.sim.cost import CostModel
from reference import Lane

Pricing = Callable[[float], tuple[CostModel, float]]  # now -> (the cost model, the share: 1 alone)


class CostClock(VirtualClock):
    def __init__(self, cost: CostModel, start: float = 0.0, pricing: Pricing | None = None) -> None:
        super().__init__(start=start)
        self.cost = cost
        self.pricing = pricing
        self.busy_s = 0.0  # time spent in steps and moves, as against waiting for arrivals

    def spend(self, lanes: Sequence[Lane], prefill: int) -> None:
        cost, share = self.pricing(self._now) if self.pricing else (self.cost, 1.0)
        spent = cost.step_s(lanes, share)
        self._now += spent
        self.busy_s += spent

    def spend_move(self, lengths: Sequence[int]) -> None:
        spent = self.cost.move_s(lengths)
        self._now += spent
        self.busy_s += spent

    def fork(self, start: float) -> CostClock:
        return CostClock(self.cost, start, self.pricing)
