"""What the GPU benchmarks share: the ceilings measured in the same run, weights that come from HBM, and rows.

- ``Ceilings``: copy bandwidth (a 1 GiB device-to-device copy, bytes read +
  written), fp32 matmul through torch with TF32 off at 4096^3, the L2 size.
- ``Rotation``: copies of a launch's inputs, enough to fill 2.5 times the L2,
  taken in turn by the timed repeats, so each repeat reads its weights from
  HBM as a real step does (a shape's 2-10 MB of weights timed 20 times in
  place would stay in a 50 MB L2 and run above the copy ceiling).
- ``Row``: one line of the table, its fraction of the ceiling that binds and
  its mark.

Imported by ``gpu_kernels.py`` after ``harness.start()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from numba_kernels.timing import gpu_time_ms

FALLBACK_L2_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Ceilings:
    copy_gbs: float
    fp32_gflops: float  # torch, TF32 off; NaN without torch's CUDA
    l2_bytes: int

    def roofline_us(self, n_bytes: float, flops: float) -> float:
        """Bytes at copy bandwidth or FLOPs at torch's fp32 rate, whichever is longer."""
        compute = flops / self.fp32_gflops / 1e3 if self.fp32_gflops == self.fp32_gflops else 0.0
        return max(n_bytes / self.copy_gbs / 1e3, compute)


def torch_cuda():
    """torch, if it has CUDA; else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_ms(run, reps: int = 20) -> float:
    torch = torch_cuda()
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def torch_matmul_ms(m: int, n: int, k: int, l2_bytes: int) -> float:
    """x [m, k] @ w [k, n] + b in torch fp32, TF32 off, weights rotated as ours are; NaN without torch."""
    torch = torch_cuda()
    if torch is None:
        return float("nan")
    torch.backends.cuda.matmul.allow_tf32 = False
    copies = copies_for(4 * k * n, l2_bytes)
    x, b = torch.randn(m, k, device="cuda"), torch.randn(n, device="cuda")
    ws = [torch.randn(k, n, device="cuda") for _ in range(copies)]
    turn = iter(range(1 << 62))
    return torch_ms(lambda: torch.addmm(b, x, ws[next(turn) % copies]))


def measure_ceilings() -> Ceilings:
    n_bytes = 1 << 30
    src, dst = cuda.device_array(n_bytes // 4, np.float32), cuda.device_array(n_bytes // 4, np.float32)
    copy_gbs = 2 * n_bytes / gpu_time_ms(dst.copy_to_device, src, reps=10) / 1e6
    del src, dst
    torch = torch_cuda()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) if torch else 0
    l2 = l2 or FALLBACK_L2_BYTES
    fp32 = 2 * 4096**3 / torch_matmul_ms(4096, 4096, 4096, 0) / 1e6 if torch else float("nan")
    return Ceilings(copy_gbs, fp32, l2)


def copies_for(n_bytes: int, l2_bytes: int) -> int:
    """Copies of an input of n_bytes that together hold 2.5 times the L2 (at least 2)."""
    return max(2, math.ceil(2.5 * l2_bytes / max(n_bytes, 1)))


class Rotation:
    """``make(i)`` -> the i-th set of a launch's arguments; each call of ``launch`` takes the next set."""

    def __init__(self, make, set_bytes: int, l2_bytes: int) -> None:
        self.sets = [make(i) for i in range(copies_for(set_bytes, l2_bytes))]
        self.turn = 0

    def time_ms(self, launch, *fixed, reps: int = 20) -> float:
        """GPU time of one ``launch(*set, *fixed)``, each repeat on the next set (``timing.gpu_time_ms``)."""

        def next_launch():
            args = self.sets[self.turn % len(self.sets)]
            self.turn += 1
            launch(*args, *fixed)

        return gpu_time_ms(next_launch, reps=reps)


def random_device(shape, seed: int = 0):
    return cuda.to_device(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    version: str
    batch: int
    shape: str
    us: float  # GPU time
    n_bytes: float
    flops: float
    best_us: float  # the ceiling's time for the same work (roofline, or torch's time)
    ceiling: str  # what best_us is
    mark: float | None = None  # the fraction of best_us / us to reach
    host_us: float | None = None

    @property
    def fraction(self) -> float:
        return self.best_us / self.us if self.us else float("nan")

    def line(self) -> str:
        known = self.fraction == self.fraction
        verdict = "" if self.mark is None or not known else ("met" if self.fraction >= self.mark else "below")
        verdict += "" if self.mark is None else f" ({self.mark:.0%})"
        rate = f"{self.n_bytes / self.us / 1e3:,.0f} GB/s" if self.n_bytes else f"{self.flops / self.us / 1e6:,.0f} GFLOP/s"
        host = "" if self.host_us is None else f"{self.host_us:,.0f}"
        return (f"| {self.what} | {self.version} | {self.batch} | {self.shape} | {self.us:,.1f} | {host} | {rate} | "
                f"{self.best_us:,.1f} ({self.ceiling}) | {self.fraction:.0%} | {verdict} |" if known else
                f"| {self.what} | {self.version} | {self.batch} | {self.shape} | {self.us:,.1f} | {host} | {rate} | "
                f"n/a | n/a | |")  # fmt: skip


HEADER = ("| what | version | batch | shape | GPU us | host us | achieved | ceiling's us | of ceiling | mark |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|---|")  # fmt: skip
