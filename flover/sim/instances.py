"""Concurrent model instances on one simulated device: each a serial engine, all sharing the device.

``flover.engine.simulate_instances`` runs instances one after another on
forked clocks, as if each had a device to itself. Here they take turns step
by step in time order, so that each step knows how many instances are busy
while it runs: with k busy on a GPU, its memory traffic and math take k
times as long (``CostModel.compute_s``'s ``share``), while its fixed
overheads overlap with the others'. On a CPU each of N instances runs on
cores / N threads of its own (as ``flover.engine.instances`` starts them),
priced by the device's figures at that many threads: alone while the
others wait, beside busy neighbours (which share its caches and memory)
while they run, and slowed further when the busy ones want more threads than
there are cores (``Plan.instance_pricing``). As in
``flover.engine.instances``, requests wait in one queue, first come first
served, and the first instance free takes the next.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

from flover.engine import Engine, EngineStats, Request, RequestResult, SerialScheduler, SlotLayout
from flover.sim.clock import CostClock, Pricing
from flover.sim.cost import CostModel
from reference.backend import Backend

BusyPricing = Callable[[int], tuple[CostModel, float]]  # busy instances -> (the cost model, the share)


class Instance:
    """One model copy: a serial engine on its own clock, and the request handed to it that it has not started."""

    def __init__(self, backend: Backend, pricing: Pricing, keep_logits: bool) -> None:
        self.clock = CostClock(pricing(0.0)[0], pricing=pricing)
        self.engine = Engine(backend, SerialScheduler(), SlotLayout(backend.config, 1), self.clock, keep_logits)
        self.inbox: deque[Request] = deque()
        self.stepped_until = 0.0  # the end of its latest step

    def busy_at(self, t: float) -> bool:
        """Whether it computes at ``t``: in a step that spans it, or with work that has arrived by then."""
        if self.stepped_until > t:  # instances advance in time order: a clock ahead of t is in a step or a wait
            return True
        e = self.engine
        return bool(e.running or e.waiting or (self.inbox and self.inbox[0].arrival_s <= t))

    def has_work(self) -> bool:
        return bool(self.engine.running or self.engine.waiting or self.inbox)

    def advance(self) -> None:
        """One iteration of its loop at its own time (a request is handed to it once both are there)."""
        now = self.clock.now()
        arrived = [self.inbox.popleft() for _ in range(len(self.inbox))]
        if self.engine.iterate(arrived, now):
            self.stepped_until = self.clock.now()


def time_shared(cost: CostModel) -> BusyPricing:
    """A GPU's pricing: with ``busy`` instances running, each one's memory and math take ``busy`` times as long."""
    return lambda busy: (cost, float(max(1, busy)))


def simulate_shared(backends: Sequence[Backend], pricing: BusyPricing,
                    requests: Sequence[Request], keep_logits: bool = False) -> tuple[list[RequestResult], EngineStats]:
    """Serve ``requests`` on one instance per backend, all on one device.

    ``pricing(busy)``: the cost model and share of the device a step runs at while ``busy`` instances run
    (``time_shared`` on a GPU; ``Plan.instance_pricing`` on either)."""
    instances: list[Instance] = []

    def now_priced(t: float) -> tuple[CostModel, float]:
        return pricing(sum(i.busy_at(t) for i in instances))

    instances.extend(Instance(b, now_priced, keep_logits) for b in backends)
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    queue: deque[Request] = deque()  # arrived, waiting for an instance
    # events in time order: an arrival, then an instance free taking the queue's head, then a step
    while pending or queue or any(i.has_work() for i in instances):
        working = [i for i in instances if i.has_work()]
        first = min(working, key=lambda i: i.clock.now(), default=None)
        stepping = first.clock.now() if first else math.inf
        # the first instance free for the queue's head, the lowest index of those free at once
        idle = [(max(i.clock.now(), queue[0].arrival_s), n, i) for n, i in enumerate(instances)
                if queue and not i.has_work()]  # fmt: skip
        freeing, _, free = min(idle, default=(math.inf, 0, None))
        if pending and pending[0].arrival_s <= min(freeing, stepping):
            queue.append(pending.popleft())
        elif freeing <= stepping:
            free.clock.wait_until(freeing)
            free.inbox.append(queue.popleft())
        else:
            first.advance()
    done, stats = [], EngineStats()
    for n, instance in enumerate(instances):
        done += [RequestResult(**{**{f: getattr(r, f) for f in r.__slots__}, "instance": n}) for r in instance.engine.done]
        stats.steps += instance.engine.stats.steps
    done.sort(key=lambda r: r.finish_s)
    return done, stats
