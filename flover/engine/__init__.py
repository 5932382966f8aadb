"""The engine: one loop (``loop``), schedulers (``scheduler``), KV layouts (``kv_layout``),
requests and step records, Flover's shuffle, and concurrent instances."""

from flover.engine.instances import InstanceProcesses, simulate_instances
from flover.engine.kv_layout import KVLayout, PagedLayout, SlotLayout
from flover.engine.live import LiveEngine, QueueFull
from flover.engine.loop import Engine
from flover.engine.records import EngineStats, Step
from flover.engine.request import Request, RequestResult, RequestState
from flover.engine.scheduler import DynamicScheduler, FusedScheduler, Scheduler, SerialScheduler

__all__ = [
    "DynamicScheduler", "Engine", "EngineStats", "FusedScheduler", "InstanceProcesses", "KVLayout", "LiveEngine",
    "PagedLayout", "QueueFull", "Request", "RequestResult", "RequestState", "Scheduler", "SerialScheduler", "SlotLayout", "Step",
    "simulate_instances",
]  # fmt: skip
