"""A simulated run: a policy's real engine and scheduler on the model-free backend and the cost-model clock.

``Plan`` is what is simulated: a device, a model shape, tensor parallelism
over nodes, a data type. It refuses what could not run: a TP degree that
does not divide the heads, ranks that do not spread evenly over the nodes,
and (``check_fits``) weights and KV memory beyond the device's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from flover.engine import Request
from flover.metrics import summarize
from flover.runner import PolicyConfig, RunResult, run_policy
from flover.sim.backend import ModelFreeFactory
from flover.sim.clock import CostClock
from flover.sim.cost import CostModel
from flover.sim.device import Device
from flover.sim.instances import BusyPricing, simulate_shared, time_shared
from flover.sim.shapes import DTYPE_BYTES, ModelShape
from reference.kv import BYTES_PER_VALUE


@dataclass(frozen=True)
class Plan:
    device: Device
    shape: ModelShape
    tp: int = 1
    nodes: int = 1
    dtype: str = ""  # empty: the device's own

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", self.dtype or self.device.dtype)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        self.device.peak_flops(self.dtype)
        c, tp, nodes = self.shape.config, self.tp, self.nodes
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"--tp must be an integer >= 1, got {tp!r}")
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"--nodes must be an integer >= 1, got {nodes!r}")
        if c.n_head % tp or c.d_mlp % tp:
            raise ValueError(f"--tp {tp} must divide {self.shape.name}'s {c.n_head} heads and its MLP width {c.d_mlp}")
        if tp % nodes:
            raise ValueError(f"--tp {tp} ranks do not spread evenly over --nodes {nodes}")
        per_node = self.device.figure("gpus_per_node", 1)
        if tp // nodes > per_node:
            raise ValueError(f"--tp {tp} over {nodes} node(s) puts {tp // nodes} ranks on a node; a node of "
                             f"{self.device.name} has {per_node:g}: raise --nodes")  # fmt: skip
        self.cost()  # a device without link figures cannot price tp > 1

    @property
    def label(self) -> str:
        """'simulated on DEVICE' and the setting, for every title and header."""
        spread = f", TP {self.tp}" + (f" over {self.nodes} nodes" if self.nodes > 1 else "") if self.tp > 1 else ""
        return f"simulated on {self.device.name} ({self.shape.name}, {self.dtype}{spread})"

    def cost(self) -> CostModel:
        return CostModel(self.device, self.shape, self.tp, self.nodes, self.dtype)

    def instance_pricing(self, n: int) -> BusyPricing:
        """``busy`` -> the cost model and share a step of one of ``n`` concurrent instances runs at while ``busy``
        of them run (``simulate_shared``).

        A GPU's instances time-share it: with k busy, each step's memory and math take k times as long. A
        CPU's get cores // n threads each (``flover.engine.instances``), priced at that many threads: alone
        while the others wait, beside busy neighbours (the figures calibrated so) while they run, and
        sharing the cores when the busy ones want more threads than there are."""
        if self.device.kind != "cpu":
            return time_shared(self.cost())
        cores = int(self.device.figure("cores", 1))
        threads = max(1, cores // n)
        alone, beside = (CostModel(self.device.with_threads(threads, a), self.shape, 1, 1, self.dtype) for a in (True, False))
        return lambda busy: (alone, 1.0) if busy <= 1 else (beside, max(1.0, busy * threads / cores))


def in_engine_values(plan: Plan, pc: PolicyConfig) -> PolicyConfig:
    """The policy the engine runs: its layouts size KV memory in float32 values (``reference.kv``), so a
    ``--kv-memory`` budget at the plan's data type becomes the float32 budget of as many positions."""
    scale = BYTES_PER_VALUE / DTYPE_BYTES[plan.dtype]
    return replace(pc, kv_memory_gib=pc.kv_memory_gib * scale) if pc.kv_memory_gib and scale != 1 else pc


def rank_bytes(plan: Plan, pc: PolicyConfig) -> tuple[float, float]:
    """(weights, KV memory) one rank holds under the policy; instances hold a copy of the model each."""
    cost, config = plan.cost(), plan.shape.config
    if pc.policy == "instances":
        return pc.instances * cost.weights_bytes(), pc.instances * cost.kv_bytes(config.n_ctx)
    shape = in_engine_values(plan, pc).layout(config).shape
    return cost.weights_bytes(), cost.kv_bytes(shape.n_blocks * shape.block_size)


def check_fits(plan: Plan, pc: PolicyConfig) -> None:
    if pc.policy == "instances" and plan.tp > 1:
        raise ValueError("the instances policy runs N model copies on one device; it cannot run under --tp")
    weights, kv = rank_bytes(plan, pc)
    memory = plan.device.figure("memory_gb") * 1e9
    if weights + kv > memory:
        what = f"{pc.instances} copies of {plan.shape.name}" if pc.policy == "instances" else plan.shape.name
        where = f"at TP {plan.tp}" if plan.tp > 1 else "on one device"
        fix = "lower --instances" if pc.policy == "instances" else "raise --tp or lower --slots or --kv-memory"
        raise ValueError(f"{pc.label}: {what} ({plan.dtype}) {where} needs {(weights + kv) / 1e9:.1f} GB per "
                         f"{plan.device.kind.upper()} (weights {weights / 1e9:.1f} GB, KV memory {kv / 1e9:.1f} GB), "
                         f"more than {plan.device.name}'s {memory / 1e9:g} GB; {fix}")  # fmt: skip


def simulate(plan: Plan, pc: PolicyConfig, requests: Sequence[Request], keep_logits: bool = False,
             on_finish=None) -> RunResult:  # fmt: skip
    """Serve ``requests`` under ``pc`` on the plan's simulated device."""
    check_fits(plan, pc)
    factory = ModelFreeFactory(plan.shape.config)
    if pc.policy != "instances":
        run = run_policy(in_engine_values(plan, pc), factory, requests, clock=CostClock(plan.cost()),
                         keep_logits=keep_logits, on_finish=on_finish)  # fmt: skip
        return at_plan_dtype(plan, replace(run, config=pc))
    pricing = plan.instance_pricing(pc.instances)
    results, stats = simulate_shared([factory(1) for _ in range(pc.instances)], pricing, requests, keep_logits)
    for result in results if on_finish else ():
        on_finish(result)
    budget = pc.instances * factory(1).kv.nbytes(plan.shape.config)
    return at_plan_dtype(plan, RunResult(pc, results, stats, summarize(results, stats, budget)))


def at_plan_dtype(plan: Plan, run: RunResult) -> RunResult:
    """The run's KV byte figures at the plan's data type (the engine counts float32 values)."""
    scale = DTYPE_BYTES[plan.dtype] / BYTES_PER_VALUE
    for key in ("kv_budget_bytes", "kv_mean_bytes", "kv_peak_bytes"):
        if key in run.metrics:
            run.metrics[key] = type(run.metrics[key])(run.metrics[key] * scale)
    return run
