"""Simulation: the real engine on a model-free backend and a cost-model clock.

- ``shapes``: model shapes for planning (GPT-2 presets, GPT-J 6B, Llama-like 13B/33B/65B);
- ``device``: devices as data files (``devices/*.json``), every figure with its source;
- ``cost``: a step's time from its lanes, a shuffle's from its bytes, tensor parallelism's from its reductions;
- ``clock``: the cost-model clock, a ``VirtualClock`` the engine runs on unchanged;
- ``backend``: the Backend protocol without the math: deterministic token streams from bookkeeping alone;
- ``instances``: concurrent instances sharing one simulated device;
- ``run``: what is simulated (``Plan``), what fits, and a policy's simulated run;
- ``fit`` and ``calibration``: fitting the figures to a published request (GPUs) or to this CPU's steps.

Everything it reports is simulated and says so.
"""

from flover.sim.backend import ModelFreeBackend, ModelFreeFactory, stream
from flover.sim.clock import CostClock
from flover.sim.cost import CostModel, StepShape
from flover.sim.device import Device, load_device
from flover.sim.run import Plan, check_fits, simulate
from flover.sim.shapes import SHAPES, ModelShape, model_shape

__all__ = [
    "SHAPES", "CostClock", "CostModel", "Device", "ModelFreeBackend", "ModelFreeFactory", "ModelShape", "Plan",
    "StepShape", "check_fits", "load_device", "model_shape", "simulate", "stream",
]  # fmt: skip
