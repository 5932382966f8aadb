"""Concurrent model instances on one simulated device: each a serial engine, all sharing the device.

``flover.engine.simulate_instances`` runs instances one after another on
forked clocks, as if each had a device to itself. Here they take turns step
by step in time order, so that each step knows how many instances are busy
while it runs: with k busy on a GPU, its memory traffic and math take k
times as long (``CostModel.compute_s``'s ``share``), while its fixed
overheads overlap with the others'. On a CPU each of N instances runs on
cores / N threads of its own (as ``flover.engine.instances`` starts them),
priced by the device's figures at that many threads and slowed only when
the busy ones want more threads than there are cores. As in ``flover.engine.instances``, a request goes, when it
arrives, to the instance with the fewest outstanding requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from flover.engine import Engine, EngineStats, Request, RequestResult, SerialScheduler, SlotLayout
from flover.sim.clock import CostClock
from flover.sim.cost import CostModel
from reference.backend import Backend


class Instance:
    """One model copy: a serial engine on its own clock, and the requests routed to it that it has not seen."""

    def __init__(self, backend: Backend, cost: CostModel, share: Callable[[float], float], keep_logits: bool) -> None:
        self.clock = CostClock(cost, share=share)
        self.engine = Engine(backend, SerialScheduler(), SlotLayout(backend.config, 1), self.clock, keep_logits)
        self.inbox: deque[Request] = deque()
        self.routed = 0

    @property
    def busy(self) -> bool:
        e = self.engine
        return bool(e.running or e.waiting or (self.inbox and self.inbox[0].arrival_s <= self.clock.now()))

    def has_work(self) -> bool:
        return bool(self.engine.running or self.engine.waiting or self.inbox)

    def outstanding(self, t: float) -> int:
        return self.routed - sum(r.finish_s <= t for r in self.engine.done)

    def advance(self) -> None:
        """One iteration of its loop at its own time, or a wait for its next request."""
        now = self.clock.now()
        arrived = []
        while self.inbox and self.inbox[0].arrival_s <= now:
            arrived.append(self.inbox.popleft())
        if not self.engine.iterate(arrived, now) and self.inbox:
            self.clock.wait_until(self.inbox[0].arrival_s)


def simulate_shared(backends: Sequence[Backend], cost: CostModel, requests: Sequence[Request], keep_logits: bool = False,
                    contention: Callable[[int], float] = lambda busy: max(1, busy),
                    ) -> tuple[list[RequestResult], EngineStats]:  # fmt: skip
    """Serve ``requests`` on one instance per backend, all on one device priced by ``cost``.

    ``contention(busy)``: how many times longer memory and math take while ``busy`` instances run: on a GPU
    the busy ones time-share it (``busy``); on a CPU each has its own cores (``Plan.instance_cost``)."""
    instances: list[Instance] = []

    def busy_now(t: float) -> float:
        return contention(sum(i.busy for i in instances))

    instances.extend(Instance(b, cost, busy_now, keep_logits) for b in backends)
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    while pending or any(i.has_work() for i in instances):
        working = [i for i in instances if i.has_work()]
        first = min(working, key=lambda i: i.clock.now(), default=None)
        if pending and (first is None or pending[0].arrival_s <= first.clock.now()):
            request = pending.popleft()  # every instance with work is at or past its arrival: counts are exact
            target = min(instances, key=lambda i: i.outstanding(request.arrival_s))
            if not target.has_work():
                target.clock.wait_until(request.arrival_s)
            target.inbox.append(request)
            target.routed += 1
        else:
            first.advance()
    done, stats = [], EngineStats()
    for n, instance in enumerate(instances):
        done += [RequestResult(**{**{f: getattr(r, f) for f in r.__slots__}, "instance": n}) for r in instance.engine.done]
        stats.steps += instance.engine.stats.steps
    done.sort(key=lambda r: r.finish_s)
    return done, stats
