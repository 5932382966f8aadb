"""What a kernel launch can reach on a device, estimated before any GPU run.

Three limits; a launch takes the longest of them plus one memory latency
(nothing streams before the first bytes arrive):

- **memory**: its bytes over the bandwidth it can draw. By Little's law a
  device delivers bandwidth = bytes in flight / latency, so the bandwidth a
  launch draws is min(peak, resident blocks x bytes each has in flight /
  latency). An H100 needs about 3.35 TB/s x 0.6 us = 2 MB in flight; twelve
  blocks holding 2 KB each draw 1% of it.
- **compute**: its FLOPs over the fp32 peak (FMA units, no tensor cores).
- **chain**: the longest sum one thread makes, one dependent FMA after
  another, times the FMA latency, once per wave of blocks. Batch invariance
  asks every output element to be summed by one thread over k ascending
  (``gemm.py``), so a GEMV with K = 3072 waits 3072 x 4 cycles (6 us)
  whatever the bandwidth: a floor no tiling removes.

These are estimates from a model, good to about 2x; a GPU run
(``benchmarks/gpu_kernels.py``) confirms or refutes them. Device figures
carry their sources; the assumed ones say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    bandwidth_gbs: float  # HBM, bytes read + written per ns
    fp32_gflops: float
    sms: int
    clock_ghz: float
    latency_ns: float  # SM -> HBM -> SM under load
    fma_cycles: int  # latency of a dependent fp32 FMA
    sources: tuple[str, ...]


H100 = Device(
    name="H100 SXM5 80GB (sm_90)",
    bandwidth_gbs=3350.0,
    fp32_gflops=66900.0,
    sms=132,
    clock_ghz=1.98,
    latency_ns=600.0,
    fma_cycles=4,
    sources=(
        "bandwidth 3.35 TB/s, fp32 67 TFLOP/s, 132 SMs, boost clock 1.98 GHz: NVIDIA H100 Tensor Core GPU datasheet "
        "and architecture whitepaper (SXM5)",
        "latency 600 ns: assumed; microbenchmarks of A100 and H100 report 450-700 cycles to HBM unloaded, more under load",
        "FMA latency 4 cycles: assumed from microbenchmarks of Volta to Hopper (dependent FFMA)",
    ),
)


@dataclass(frozen=True, slots=True)
class Work:
    """One launch, as the model sees it."""

    bytes: float  # DRAM bytes read + written, each weight once
    flops: float
    blocks: int
    inflight: float  # bytes one block has requested before it must wait for the first of them
    chain: int  # dependent FMAs (or adds) of the longest serial sum one thread makes


@dataclass(frozen=True, slots=True)
class Estimate:
    us: float
    bound: str  # memory, latency (too few bytes in flight), compute or chain
    memory_us: float
    chain_us: float
    bandwidth_gbs: float  # what the launch can draw

    def of_bandwidth(self, work: Work, device: Device) -> float:
        """Fraction of the device's bandwidth the launch reaches: bytes / time / peak."""
        return work.bytes / (self.us * 1e3) / device.bandwidth_gbs


def estimate(work: Work, blocks_per_sm: int, device: Device = H100) -> Estimate:
    """The longest of the three limits; blocks_per_sm from the occupancy of the compiled kernel."""
    resident = max(1, min(work.blocks, device.sms * max(1, blocks_per_sm)))
    drawn = min(device.bandwidth_gbs, resident * work.inflight / device.latency_ns)  # GB/s == bytes/ns
    memory_us = work.bytes / drawn / 1e3 if work.bytes else 0.0
    compute_us = work.flops / device.fp32_gflops / 1e3
    waves = math.ceil(work.blocks / resident)
    chain_us = waves * work.chain * device.fma_cycles / device.clock_ghz / 1e3
    limits = {"memory" if drawn >= device.bandwidth_gbs else "latency": memory_us, "compute": compute_us,
              "chain": chain_us}  # fmt: skip
    bound = max(limits, key=limits.get)
    return Estimate(limits[bound] + device.latency_ns / 1e3, bound, memory_us, chain_us, drawn)


def ideal_us(work: Work, device: Device = H100) -> float:
    """The plain roofline: bytes at peak bandwidth or FLOPs at peak compute, whichever is longer."""
    return max(work.bytes / device.bandwidth_gbs, work.flops / device.fp32_gflops) / 1e3
