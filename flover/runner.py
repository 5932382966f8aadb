"""Run one serving policy over a trace and collect what a report needs.

A policy is a scheduler, a KV layout and their settings; every policy but
``instances`` runs on the one engine loop (``flover.engine.Engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flover.clock import VirtualClock, WallClock
from flover.engine import (
    DynamicScheduler,
    Engine,
    EngineStats,
    FusedScheduler,
    InstanceProcesses,
    PagedLayout,
    Request,  # fmt: skip
    RequestResult,
    Scheduler,
    SerialScheduler,
    SlotLayout,
    simulate_instances,
)
from flover.engine.kv_layout import KVLayout
from flover.metrics import summarize
from reference import GPTConfig, KVShape, Lane, check_request
from reference.backend import Backend
from reference.kv import bytes_per_position

POLICIES = ("fused", "serial", "dynamic", "instances")
LAYOUTS = ("slots", "paged")
PREFILLS = ("alone", "chunked")

BackendFactory = Callable[[int | KVShape], Backend]  # KV memory -> a fresh backend


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    policy: str = "fused"
    slots: int = 16  # fused: KV slots, the most requests fused in one step (and the default KV budget)
    shuffle: bool = True  # fused, slots: Flover's memory shuffle
    kv: str = "slots"  # fused: KV layout, slots or paged
    block_size: int = 16  # paged: positions per block
    kv_memory_gib: float | None = None  # fused: the KV budget; None: what `slots` full-context slots need
    prefill: str = "alone"  # fused: each prompt alone, or chunked into the decode steps
    chunk_tokens: int = 256  # chunked: the most tokens in one step
    max_batch: int = 16  # dynamic
    queue_delay_s: float = 0.05  # dynamic: how long a batch waits after its first request
    instances: int = 2  # instances

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)} or all")
        for name, allowed in (("kv", LAYOUTS), ("prefill", PREFILLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("slots", "max_batch", "instances", "block_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.queue_delay_s >= 0:
            raise ValueError(f"queue delay must be >= 0 ms, got {self.queue_delay_s * 1e3:g}")
        if self.kv_memory_gib is not None and not self.kv_memory_gib > 0:
            raise ValueError(f"kv-memory must be > 0 GiB, got {self.kv_memory_gib:g}")

    @property
    def label(self) -> str:
        if self.policy == "fused":
            memory = f"paged {self.block_size}" if self.kv == "paged" else "slots"
            if self.kv_memory_gib:
                memory += f" in {self.kv_memory_gib:.3g} GiB"
            elif self.kv == "slots":
                memory += f" {self.slots}"
            memory += "" if self.kv == "paged" or self.shuffle else ", no shuffle"
            chunked = f", chunked {self.chunk_tokens}" if self.prefill == "chunked" else ""
            return f"fused ({memory}{chunked})"
        if self.policy == "dynamic":
            return f"dynamic (batch {self.max_batch}, delay {self.queue_delay_s * 1e3:g} ms)"
        if self.policy == "instances":
            return f"instances ({self.instances})"
        return "serial"

    def kv_budget(self, config: GPTConfig) -> int:
        """Bytes of KV memory the policy may use."""
        if self.policy == "fused" and self.kv_memory_gib is not None:
            return int(self.kv_memory_gib * 2**30)
        slots = {"fused": self.slots, "dynamic": self.max_batch}.get(self.policy, 1)
        return slots * bytes_per_position(config) * config.n_ctx

    def layout(self, config: GPTConfig) -> KVLayout:
        """A fresh KV layout sized from the budget (instances: each instance's own)."""
        budget = self.kv_budget(config)
        gib = budget / 2**30 if self.kv_memory_gib is None else self.kv_memory_gib
        if self.policy == "fused" and self.kv == "paged":
            n_blocks = budget // (bytes_per_position(config) * self.block_size)
            if n_blocks < 1:
                raise ValueError(f"--kv-memory {gib:g} GiB holds no block of {self.block_size} positions")
            return PagedLayout(config, n_blocks, self.block_size)
        slot = bytes_per_position(config) * config.n_ctx
        if budget < slot:
            raise ValueError(f"--kv-memory {gib:g} GiB holds no slot of {config.n_ctx} positions "
                             f"({slot / 2**20:.1f} MiB); raise it")  # fmt: skip
        if self.policy == "dynamic":  # finished members stay in the batch as padding
            return SlotLayout(config, budget // slot, shuffle=False, pad_batch=True)
        return SlotLayout(config, budget // slot, shuffle=self.shuffle or self.policy != "fused")

    def scheduler(self) -> Scheduler:
        if self.policy == "fused":
            return FusedScheduler(self.prefill, self.chunk_tokens)
        if self.policy == "dynamic":
            return DynamicScheduler(self.max_batch, self.queue_delay_s)
        return SerialScheduler()


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


def warm_up(backend: Backend) -> None:
    """Compile and page in everything a run touches, so no policy pays for it: a prompt of 4 tokens,
    then a decode step of one lane and of two (each lane in blocks of its own)."""
    config, kv = backend.config, backend.kv
    tokens = np.arange(4) % config.vocab_size
    m = -(-5 // kv.block_size)  # blocks for positions 0..4
    lanes = [Lane.of(np.arange(i * m, (i + 1) * m), tokens, 0) for i in range(min(kv.n_blocks // m, 2))]
    for lane in lanes:
        backend.step([lane])
    backend.step([Lane.of(lane.blocks, tokens[:1], 4) for lane in lanes])
    backend.step([Lane.of(lanes[0].blocks, tokens[:1], 4)])


def fits(have: KVShape, need: KVShape) -> bool:
    return have.block_size == need.block_size and have.n_blocks >= need.n_blocks


def run_policy(pc: PolicyConfig, make_backend: BackendFactory, requests: Sequence[Request], clock=None,
               keep_logits: bool = False, on_finish=None, backend: Backend | None = None) -> RunResult:  # fmt: skip
    """Serve ``requests`` under one policy. ``backend`` is reused when its KV memory fits the
    policy's layout (else a fresh one is made, and warmed up on the wall clock); ``instances`` always
    makes its own single-slot backends."""
    config = backend.config if backend is not None else getattr(make_backend, "config", None)
    config = config or make_backend(1).config
    clock = clock or WallClock()
    if pc.policy == "instances":
        return run_instances(pc, make_backend, requests, clock, keep_logits, on_finish)
    layout = pc.layout(config)
    if backend is None or not fits(backend.kv, layout.shape):
        backend = make_backend(layout.shape)
        if isinstance(clock, WallClock):
            warm_up(backend)  # a fresh backend's first steps compile and page in: not the policy's time
    if isinstance(clock, WallClock):
        clock = WallClock()  # started once the backends exist
    engine = Engine(backend, pc.scheduler(), layout, clock, keep_logits, on_finish)
    results = engine.run(requests)
    return RunResult(pc, results, engine.stats, summarize(results, engine.stats, layout.shape.nbytes(config)))


def run_instances(pc: PolicyConfig, make_backend: BackendFactory, requests: Sequence[Request], clock,
                  keep_logits: bool, on_finish) -> RunResult:  # fmt: skip
    """Instances in processes on the wall clock (``make_backend`` must pickle), simulated on a virtual one."""
    if isinstance(clock, VirtualClock):
        backends = [make_backend(1) for _ in range(pc.instances)]
        results, stats = simulate_instances(backends, requests, clock, keep_logits, on_finish)
        budget = pc.instances * backends[0].kv.nbytes(backends[0].config)
        return RunResult(pc, results, stats, summarize(results, stats, budget))
    pool = InstanceProcesses(make_backend, pc.instances, keep_logits)
    try:
        results, stats = pool.run(requests, WallClock(), on_finish)
    finally:
        pool.close()
    config = make_backend.config
    budget = pc.instances * bytes_per_position(config) * config.n_ctx
    return RunResult(pc, results, stats, summarize(results, stats, budget))
