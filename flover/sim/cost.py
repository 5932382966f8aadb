"""The cost model: a step's time from its lanes, a shuffle's from the bytes it moves, tensor parallelism's
from its reductions.

A step is priced per layer and op on one tensor-parallel rank (Megatron's
split: QKV and the first MLP matrix by columns, the attention output and the
second MLP matrix by rows, heads and the vocabulary divided among the ranks):

    op time   = combine(bytes / (bandwidth x efficiency), FLOPs / (peak x efficiency))
    combine   = max(memory, math) + (1 - overlap) x min(memory, math)
    step time = n_layer x (sum of the layer's ops + layer overhead) + LM head
                + lanes x lane overhead + reductions

``overlap`` 1 is the roofline (a GPU kernel streams its operands while it
computes, Williams et al. 2009); a CPU kernel overlaps less, and calibration
fits it. A decode lane reads its whole cache (K and V of every position it
attends over) once; a prefill lane of n tokens reads it once too, the way a
fused attention kernel tiles it. A hole computed without the shuffle is just
another lane: the departed request's last token over its last length.

Reductions follow the ring all-reduce (Patarasuk and Yuan 2009): 2(N-1)
hops, each a link latency, moving 2(N-1)/N of the bytes at the slowest
link's bandwidth: NVLink (one direction, half the spec sheet's bidirectional
figure) within a node, InfiniBand across nodes. Two per layer (after the
attention output and after the MLP, Megatron-LM's f and g), and an all-gather
of the logits at the end.

Instances that share one device share its bandwidth and compute: with k of
them busy, each one's memory and math take k times as long, while its fixed
overheads (launches, host work) overlap with the others' (``share``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flover.sim.device import Device
from flover.sim.shapes import DTYPE_BYTES, ModelShape
from reference import Lane


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step's cost depends on."""

    rows: int  # N: new tokens of all lanes
    lanes: int  # L: lanes (each has one row of logits)
    cached: int  # positions whose K and V the lanes read: sum of each lane's end
    attended: int  # sum over rows of the positions each attends over (its own included)

    @classmethod
    def of(cls, lanes: Sequence[Lane]) -> StepShape:
        rows = cached = attended = 0
        for lane in lanes:
            s, e = lane.start, lane.start + len(lane.tokens)
            rows += e - s
            cached += e
            attended += (e * (e + 1) - s * (s + 1)) // 2  # rows at positions s..e-1 attend over p + 1 each
        return cls(rows, len(lanes), cached, attended)

    @classmethod
    def decode(cls, batch: int, position: int) -> StepShape:
        """``batch`` lanes of one token at ``position``."""
        return cls(batch, batch, batch * (position + 1), batch * (position + 1))

    @classmethod
    def prefill(cls, tokens: int) -> StepShape:
        return cls(tokens, 1, tokens, tokens * (tokens + 1) // 2)


@dataclass(frozen=True, slots=True)
class Work:
    """One op on one rank."""

    bytes: float
    flops: float


def layer_work(shape: ModelShape, s: StepShape, tp: int = 1, value_bytes: int = 2) -> dict[str, Work]:
    """Each op of one layer on one rank."""
    c, m, t, b, n = shape.config.n_embd, shape.config.d_mlp, tp, value_bytes, s.rows
    g = shape.mlp_matrices - 1  # matrices C -> d_mlp: 1 (GELU), 2 (SwiGLU's gate and up)
    return {
        "qkv": Work(b * (3 * c * c / t + n * (c + 3 * c / t)), 2 * n * c * 3 * c / t),
        # K and V of every cached position read once, the new ones written, q in and the output out
        "attention": Work(b * 2 * c / t * (s.cached + 2 * n), 4 * c / t * s.attended),
        "attention_out": Work(b * (c * c / t + n * (c / t + c)), 2 * n * c * c / t),
        "mlp_in": Work(b * (g * c * m / t + n * (c + g * m / t)), 2 * n * c * g * m / t),
        "mlp_out": Work(b * (m * c / t + n * (m / t + c)), 2 * n * m * c / t),
        # two norms, two residual adds, the activation: small next to the matmuls
        "elementwise": Work(b * n * (10 * c + 2 * g * m / t), n * (10 * c + 8 * g * m / t)),
    }


def head_work(shape: ModelShape, s: StepShape, tp: int = 1, value_bytes: int = 2) -> Work:
    """Embedding rows in, the final norm and the LM head (vocabulary split over the ranks) for each lane."""
    c, v, t, b = shape.config.n_embd, shape.config.vocab_size, tp, value_bytes
    return Work(b * (c * v / t + s.rows * c + s.lanes * (2 * c + v / t)), 2 * s.lanes * c * v / t)


class CostModel:
    """Seconds of a step of ``shape`` on ``device``, over ``tp`` ranks spread across ``nodes`` nodes."""

    def __init__(self, device: Device, shape: ModelShape, tp: int = 1, nodes: int = 1, dtype: str | None = None) -> None:
        self.device, self.shape, self.tp, self.nodes = device, shape, tp, nodes
        self.dtype = dtype or device.dtype
        self.value_bytes = DTYPE_BYTES[self.dtype]
        self.bandwidth = device.figure("memory_bandwidth_gb_s") * 1e9 * device.figure("bandwidth_efficiency")  # B/s
        peak = device.peak_flops(self.dtype)
        self.matmul_rate = peak * device.figure("compute_efficiency")  # FLOP/s
        self.attention_rate = peak * device.figure("attention_efficiency", device.figure("compute_efficiency"))
        self.copy_bandwidth = device.figure("copy_bandwidth_gb_s", self.bandwidth / 1e9) * 1e9  # read + written
        self.overlap = device.figure("overlap")
        self.layer_overhead_s = device.figure("layer_overhead_s")
        self.lane_overhead_s = device.figure("lane_overhead_s", 0.0)
        self.link_bandwidth, self.link_latency_s = self._ring_link() if tp > 1 else (float("inf"), 0.0)
        self.priced: dict[tuple[StepShape, float], float] = {}  # steps repeat (a serial run's, at each position)

    def _ring_link(self) -> tuple[float, float]:
        """(bytes/s, seconds per hop) of the ring's slowest link."""
        d = self.device
        if not d.has("nvlink_gb_s", "nvlink_latency_s"):
            raise ValueError(f"device {d.name} has no NVLink figures; it cannot price tensor parallelism")
        bandwidth, latency = d.figure("nvlink_gb_s") / 2 * 1e9, d.figure("nvlink_latency_s")
        if self.nodes > 1:
            if not d.has("infiniband_gb_s", "infiniband_latency_s"):
                raise ValueError(f"device {d.name} has no InfiniBand figures; it cannot price --nodes {self.nodes}")
            bandwidth = min(bandwidth, d.figure("infiniband_gb_s") * 1e9)
            latency = max(latency, d.figure("infiniband_latency_s"))
        return bandwidth, latency

    def op_s(self, work: Work, rate: float, share: float = 1.0) -> float:
        memory, math = share * work.bytes / self.bandwidth, share * work.flops / rate
        return max(memory, math) + (1 - self.overlap) * min(memory, math)

    # ------------------------------------------------------------------ a step

    def compute_s(self, s: StepShape, share: float = 1.0) -> float:
        """Memory and math: what instances sharing the device contend for."""
        ops = layer_work(self.shape, s, self.tp, self.value_bytes).items()
        layer = sum(self.op_s(work, self.attention_rate if op == "attention" else self.matmul_rate, share)
                    for op, work in ops)  # fmt: skip
        head = head_work(self.shape, s, self.tp, self.value_bytes)
        return self.shape.config.n_layer * layer + self.op_s(head, self.matmul_rate, share)

    def overhead_s(self, s: StepShape) -> float:
        return self.shape.config.n_layer * self.layer_overhead_s + s.lanes * self.lane_overhead_s

    def communication_s(self, s: StepShape) -> float:
        if self.tp == 1:
            return 0.0
        activations = s.rows * self.shape.config.n_embd * self.value_bytes
        logits = s.lanes * self.shape.config.vocab_size * self.value_bytes
        return 2 * self.shape.config.n_layer * self.all_reduce_s(activations) + self.all_gather_s(logits)

    def shape_s(self, s: StepShape, share: float = 1.0) -> float:
        seconds = self.priced.get((s, share))
        if seconds is None:
            if len(self.priced) > 2**16:
                self.priced.clear()
            seconds = self.priced[s, share] = self.compute_s(s, share) + self.overhead_s(s) + self.communication_s(s)
        return seconds

    def step_s(self, lanes: Sequence[Lane], share: float = 1.0) -> float:
        return self.shape_s(StepShape.of(lanes), share)

    # ------------------------------------------------------------------ reductions and copies

    def all_reduce_s(self, nbytes: float) -> float:
        """Ring all-reduce of ``nbytes`` over the tp ranks: 2(N-1) hops, 2(N-1)/N of the bytes on each link."""
        n = self.tp
        return 2 * (n - 1) * self.link_latency_s + 2 * (n - 1) / n * nbytes / self.link_bandwidth if n > 1 else 0.0

    def all_gather_s(self, nbytes: float) -> float:
        """Ring all-gather of ``nbytes`` in all: N-1 hops, (N-1)/N of the bytes."""
        n = self.tp
        return (n - 1) * self.link_latency_s + (n - 1) / n * nbytes / self.link_bandwidth if n > 1 else 0.0

    def move_s(self, lengths: Sequence[int]) -> float:
        """The memory shuffle: each moved slot's K and V of every layer, read once and written once."""
        moved = sum(int(n) for n in lengths) * self.shape.kv_bytes_per_position(self.dtype) / self.tp
        return 2 * moved / self.copy_bandwidth

    # ------------------------------------------------------------------ memory

    def weights_bytes(self) -> float:
        """One rank's share of the weights."""
        return self.shape.weights_bytes(self.dtype) / self.tp

    def kv_bytes(self, positions: int) -> float:
        """One rank's share of the K and V of ``positions`` positions."""
        return positions * self.shape.kv_bytes_per_position(self.dtype) / self.tp
