"""Run one serving policy over a trace and collect what a report needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flover.clock import WallClock
from flover.engine import EngineStats, FusionEngine
from flover.metrics import summarize
from flover.policies import run_dynamic, run_instances, run_serial
from flover.request import Request, RequestResult
from reference import GPTConfig, check_request
from reference.backend import Backend

POLICIES = ("fused", "serial", "dynamic", "instances")

BackendFactory = Callable[[int], Backend]  # n_slots -> a fresh backend


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy: str = "fused"
    slots: int = 16  # fused: KV slots, the most requests fused in one step
    shuffle: bool = True  # fused: Flover's memory shuffle
    max_batch: int = 16  # dynamic
    window_s: float = 0.05  # dynamic: how long a batch waits after its first request
    instances: int = 2  # instances

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)} or all")
        for name in ("slots", "max_batch", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.window_s < 0:
            raise ValueError(f"window must be >= 0 ms, got {self.window_s * 1e3:g}")

    @property
    def label(self) -> str:
        if self.policy == "fused":
            return f"fused (slots {self.slots}{'' if self.shuffle else ', no shuffle'})"
        if self.policy == "dynamic":
            return f"dynamic (batch {self.max_batch}, window {self.window_s * 1e3:g} ms)"
        if self.policy == "instances":
            return f"instances ({self.instances})"
        return "serial"

    @property
    def slots_needed(self) -> int:
        return {"fused": self.slots, "dynamic": self.max_batch}.get(self.policy, 1)


@dataclass(slots=True)
class RunResult:
    config: PolicyConfig
    results: list[RequestResult]
    stats: EngineStats = field(default_factory=EngineStats)
    metrics: dict = field(default_factory=dict)

    def as_json(self, extra: dict | None = None) -> dict:
        return {"policy": self.config.policy, "config": {**asdict(self.config), **(extra or {})},
                "requests": [r.as_json() for r in sorted(self.results, key=lambda r: str(r.id))],
                "metrics": self.metrics}  # fmt: skip


def check_trace(config: GPTConfig, requests: Sequence[Request]) -> None:
    """Every request must fit the model; the error names the request."""
    for r in requests:
        try:
            check_request(config, r.prompt_ids, r.max_new_tokens)
            bad = [t for t in r.stop_ids if not 0 <= t < config.vocab_size]
            if bad:
                raise ValueError(f"stop id {bad[0]} is outside the vocabulary 0..{config.vocab_size - 1}")
        except ValueError as error:
            raise ValueError(f"request {r.id!r}: {error}") from None


def warm_up(backend: Backend, config: GPTConfig) -> None:
    """Compile and page in everything a run touches, so no policy pays for it."""
    tokens = np.arange(4) % config.vocab_size
    for slot in range(min(backend.n_slots, 2)):
        backend.prefill(slot, tokens)
    for n in sorted({1, min(backend.n_slots, 2)}):
        backend.decode(np.arange(n), tokens[:n], np.full(n, 4))


def run_policy(pc: PolicyConfig, make_backend: BackendFactory, requests: Sequence[Request], clock=None,
               keep_logits: bool = False, on_finish=None, backend: Backend | None = None) -> RunResult:  # fmt: skip
    """Serve ``requests`` under one policy. ``backend`` may be reused between policies
    when it has enough slots; ``instances`` always makes its own single-slot backends."""
    if pc.policy == "instances":
        backends = [make_backend(1) for _ in range(pc.instances)]
    elif backend is None or backend.n_slots < pc.slots_needed:
        backend = make_backend(pc.slots_needed)
    clock = clock or WallClock()  # started once the backends exist
    stats = EngineStats()
    kwargs = dict(clock=clock, keep_logits=keep_logits, on_finish=on_finish)
    if pc.policy == "instances":
        results = run_instances(backends, requests, stats=stats, **kwargs)
    else:
        if pc.policy == "fused":
            engine = FusionEngine(backend, shuffle=pc.shuffle, capacity=pc.slots, **kwargs)
            results = engine.run(requests)
            stats = engine.stats
        elif pc.policy == "serial":
            results = run_serial(backend, requests, stats=stats, **kwargs)
        else:
            results = run_dynamic(backend, requests, pc.max_batch, pc.window_s, stats=stats, **kwargs)
    return RunResult(pc, results, stats, summarize(results, stats.steps))
