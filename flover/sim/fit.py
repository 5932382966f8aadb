"""Fitting a device's free figures to measurements.

Two fits, and only these:

- A GPU's fixed cost per layer and step, from one published request
  (``PUBLISHED``): everything else in the GPU files is a specification sheet
  figure or a stated assumption, and nothing is fitted to the results the
  simulator is then used to predict.
- This machine's CPU (``fit_cpu``): effective bandwidth, FLOP rates, overlap
  and fixed cost per layer, from decode steps and prefills measured with the
  NumPy backend (``flover.sim.calibration``). For a fixed overlap and a fixed
  choice of which term dominates each op, a step's time is linear in
  (1/bandwidth, 1/matmul rate, 1/attention rate, layer overhead), so the fit
  is a linear least-squares solve on relative errors, repeated until the
  choice settles, for each overlap on a grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flover.sim.cost import CostModel, StepShape, Work, head_work, layer_work
from flover.sim.device import Device
from flover.sim.shapes import ModelShape, model_shape


@dataclass(frozen=True, slots=True)
class Published:
    """One request served alone, as a paper reports it."""

    model: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    source: str


PUBLISHED = Published(
    "gptj-6b", 8, 512, 5.7,
    "Flover (Yao et al. 2023, arXiv 2305.13484): one GPT-J 6B request, 8 prompt tokens, about 512 new tokens, "
    "fp16 FasterTransformer on an A100-class GPU, about 5.6 to 5.8 s (about 11 ms a decode step); midpoint 5.7 s",
)  # fmt: skip


def request_steps(prompt: int, new_tokens: int) -> list[StepShape]:
    """A request alone: its prefill (which yields the first token), then a decode step for each other token."""
    return [StepShape.prefill(prompt)] + [StepShape.decode(1, prompt + i) for i in range(new_tokens - 1)]


def fit_layer_overhead(device: Device, published: Published = PUBLISHED) -> float:
    """The fixed cost per layer and step that makes the published request take its published time."""
    shape = model_shape(published.model)
    cost = CostModel(device, shape, dtype="fp16")
    steps = request_steps(published.prompt_tokens, published.new_tokens)
    variable = sum(cost.compute_s(s) + cost.communication_s(s) + s.lanes * cost.lane_overhead_s for s in steps)
    overhead = (published.seconds - variable) / (len(steps) * shape.config.n_layer)
    if overhead < 0:
        raise ValueError(f"{device.name}: memory and math alone take {variable:.2f} s, more than the published "
                         f"{published.seconds} s; its bandwidth or efficiency figures are too low")  # fmt: skip
    return overhead


@dataclass(frozen=True, slots=True)
class Measured:
    kind: str  # decode or prefill
    shape: StepShape
    seconds: float


@dataclass(frozen=True, slots=True)
class CpuFit:
    bandwidth: float  # effective bytes/s
    matmul_rate: float  # effective FLOP/s
    attention_rate: float
    layer_overhead_s: float
    overlap: float
    modelled: list[float]  # seconds, one per measurement

    def unmeasured(self) -> list[str]:
        """The figures the measurements could not see, left at their floor."""
        at_floor = (1 / self.bandwidth <= FLOOR[0] * 1.001, 1 / self.matmul_rate <= FLOOR[1] * 1.001)
        return [name for name, floor in zip(("bandwidth", "FLOP rate"), at_floor) if floor]

    def errors(self, measured: Sequence[Measured]) -> np.ndarray:
        """Relative error of each modelled step: (modelled - measured) / measured."""
        return np.array([(m - x.seconds) / x.seconds for m, x in zip(self.modelled, measured)])


def _terms(shape: ModelShape, s: StepShape, overlap: float, params: np.ndarray) -> np.ndarray:
    """The coefficients of (1/bandwidth, 1/matmul rate, 1/attention rate, layer overhead) in a step's time
    (fp32, one rank), each op's dominant term chosen with the current ``params``."""
    row = np.zeros(4)
    for op, work in layer_work(shape, s, 1, 4).items():
        row += shape.config.n_layer * _op_row(work, 2 if op == "attention" else 1, overlap, params)
    row += _op_row(head_work(shape, s, 1, 4), 1, overlap, params)
    row[3] = shape.config.n_layer
    return row


def _op_row(work: Work, rate: int, overlap: float, params: np.ndarray) -> np.ndarray:
    """combine(bytes x params[0], flops x params[rate]) as coefficients of params."""
    row = np.zeros(4)
    memory_bound = work.bytes * params[0] >= work.flops * params[rate]
    row[0] += work.bytes * (1.0 if memory_bound else 1 - overlap)
    row[rate] += work.flops * (1 - overlap if memory_bound else 1.0)
    return row


# The smallest coefficients (the fastest rates) a fit reports: 100 TB/s, 1 PFLOP/s, no fixed cost. A figure
# at its floor was not measurable: the model's steps are too small for it to show (see ``unmeasured``).
FLOOR = np.array([1 / 100e12, 1 / 1e15, 1 / 1e15, 0.0])


# Where the alternating solve starts: which term dominates each op is only settled by the solve itself, and
# from one start it can settle on a worse choice; each start is tried and the best fit kept.
STARTS = (
    np.array([1 / 20e9, 1 / 100e9, 1 / 100e9, 1e-4]),  # 20 GB/s, 100 GFLOP/s, 0.1 ms a layer
    np.array([FLOOR[0], 1 / 30e9, 1 / 30e9, 1e-3]),  # math and fixed costs only
    np.array([1 / 5e9, 1 / 300e9, 1 / 300e9, 0.0]),  # memory only
)


def _solve(shape: ModelShape, measured: Sequence[Measured], overlap: float, tied: bool, start: np.ndarray,
           rounds: int = 20) -> np.ndarray:  # fmt: skip
    """Coefficients >= 0 minimising the squared relative errors; ``tied``: attention at the matmuls' rate."""
    t = np.array([m.seconds for m in measured])
    params = start.copy()
    for _ in range(rounds):
        a = np.array([_terms(shape, m.shape, overlap, params) for m in measured]) / t[:, None]  # relative
        if tied:
            a[:, 1] += a[:, 2]
            a[:, 2] = 0
        free = np.array([True, True, not tied, True])
        while True:  # drop a coefficient that comes out negative and solve again
            x = np.zeros(4)
            x[free] = np.linalg.lstsq(a[:, free], np.ones(len(t)), rcond=None)[0]
            if (x >= 0).all():
                break
            free &= x > 0
        params = np.maximum(x, FLOOR)
        if tied:
            params[2] = params[1]
    return params


def _modelled(shape: ModelShape, measured: Sequence[Measured], overlap: float, params: np.ndarray) -> np.ndarray:
    """Each measured step as the model prices it with these coefficients (each op's dominant term re-chosen)."""
    return np.array([_terms(shape, m.shape, overlap, params) @ params for m in measured])


def fit_cpu(shape: ModelShape, measured: Sequence[Measured],
            overlaps: Sequence[float] = tuple(np.linspace(0, 1, 11))) -> CpuFit:  # fmt: skip
    """The best fit over the overlaps and starts, judged by the model's own relative errors on the
    measurements; attention gets a rate of its own only where the data gives it one."""
    t = np.array([m.seconds for m in measured])
    fits = []
    for tied in (False, True):
        for overlap in overlaps:
            for start in STARTS:
                params = _solve(shape, measured, overlap, tied, start)
                if params[2] > FLOOR[2] or tied:  # untied, but attention came out free: the tied fit says it better
                    error = float(np.sqrt(np.mean((_modelled(shape, measured, overlap, params) / t - 1) ** 2)))
                    fits.append((error, overlap, params))
    _, overlap, params = min(fits, key=lambda f: f[0])
    modelled = _modelled(shape, measured, overlap, params).tolist()
    return CpuFit(1 / params[0], 1 / params[1], 1 / params[2], float(params[3]), float(overlap), modelled)
