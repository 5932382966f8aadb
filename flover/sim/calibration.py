"""Calibrating this machine's CPU: measure step costs with the real NumPy backend, fit, write a device file.

Measured: decode steps over batch sizes and context lengths, prefills over
prompt lengths, a memory shuffle's copies, and the host's work per lane
(the engine samples each lane's token from its logits). On a machine of
several cores, also the small steps a serial instance makes on one thread:
alone, and beside busy neighbour processes (``flover.sim.neighbour``), the
two ways concurrent instances run. The points take
turns in rounds, so that a noisy neighbour slows every point alike, and a
figure is the median call. ``fit_cpu`` then fits the figures, and
``device_record`` writes them with the measurements, the fit's error on
each, and when, where and how they were taken.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from flover.engine import Request, RequestState
from flover.sim.cost import StepShape
from flover.sim.fit import CpuFit, Measured, fit_cpu
from flover.sim.neighbour import NeighbourProcesses
from flover.sim.shapes import ModelShape
from reference import Lane, NumpyBackend, init_weights
from reference.backend import ONE_THREAD_BELOW, block_weights

GRIDS = {  # decode batches, decode positions, prefill lengths, shuffle (slots, positions)
    "full": ((1, 2, 4, 8, 16, 32), (16, 256, 768), (8, 32, 128, 384), (8, 512)),
    "quick": ((1, 4, 16), (8, 96, 192), (8, 32, 128), (4, 128)),
}
# On one thread (what each of N concurrent instances gets of N cores): small batches and prompts only, the
# steps a serial instance makes; the figures between one thread and all are interpolated (``Device.with_threads``).
ONE_THREAD_GRIDS = {"full": ((1, 2, 4), (16, 256, 768), (8, 32, 128)), "quick": ((1, 4), (8, 96, 192), (8, 32))}


@dataclass(slots=True)
class Calibration:
    shape: ModelShape
    measured: list[Measured] = field(default_factory=list)
    # The same steps on one thread (none: cores == 1): beside busy neighbour processes, as concurrent instances
    # run while all are busy, and alone, as one runs while the others wait (``flover.sim.neighbour``)
    one_thread: list[Measured] = field(default_factory=list)
    one_thread_alone: list[Measured] = field(default_factory=list)
    lane_overhead_s: float = 0.0
    copy_bandwidth: float = 0.0  # bytes read + written per second
    threads: int = 1
    started: str = ""
    load: tuple[float, float] = (0.0, 0.0)  # load average before and after


def time_round(fns: dict, times: dict, repeats: int, progress: Callable[[], None] | None = None) -> None:
    """One round: each function called once untimed, then ``repeats`` times timed into ``times[key]``."""
    for key, fn in fns.items():
        fn()  # untimed: caches, and the previous point's threads going to sleep
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.setdefault(key, []).append(time.perf_counter() - begin)
        if progress:
            progress()


def medians(times: dict) -> dict:
    """Each point's median call.

    The median, not the fastest: a run pays what a step typically costs, and even on a quiet machine a
    step's calls vary (threads waking, memory traffic). On this project's 2-core machine the fastest of
    30 batch-1 gpt2 decode steps was 10-20% below their median, and a simulator calibrated on fastest
    calls predicted every in-process policy's latency 15-45% low. Rounds of every point taking turns
    spread any slow spell over every point alike.
    """
    return {key: float(np.median(t)) for key, t in times.items()}


def lane_overhead_s(vocab_size: int, repeats: int = 300) -> float:
    """The engine's host work for one lane: its Lane, and sampling its token from [V] logits."""
    state = RequestState.start(Request(0, 0.0, (1,), 10**9))
    logits = np.random.default_rng(0).standard_normal(vocab_size).astype(np.float32)
    blocks, tokens = np.array([0]), np.array([1])
    begin = time.perf_counter()
    for _ in range(repeats):
        Lane.of(blocks, tokens, 0)
        state.accept(logits, 0.0)
    return (time.perf_counter() - begin) / repeats


def step_points(backend: NumpyBackend, batches, positions, prompts) -> dict[tuple[str, int, int], Callable[[], object]]:
    """A call per decode (batch, position) and per prefill length, keyed (kind, batch, position or length)."""
    points: dict[tuple[str, int, int], Callable[[], object]] = {}
    for b in batches:
        for p in positions:
            lanes = [Lane.of(backend.slot_blocks(s), [1], p) for s in range(b)]
            points[("decode", b, p)] = lambda lanes=lanes: backend.step(lanes)
    for n in prompts:
        lane = Lane.of(backend.slot_blocks(0), np.arange(n) % backend.config.vocab_size, 0)
        points[("prefill", 1, n)] = lambda lane=lane: backend.step([lane])
    return points


def measured_steps(best: dict[tuple[str, int, int], float]) -> list[Measured]:
    shapes = {"decode": StepShape.decode, "prefill": lambda b, n: StepShape.prefill(n)}
    return [Measured(kind, shapes[kind](b, p), s) for (kind, b, p), s in best.items() if kind in shapes]


def times_one_thread(config) -> bool:
    """Whether ``measure`` also times one thread: there are several, and the backend would use them."""
    return numba.get_num_threads() > 1 and block_weights(config) >= ONE_THREAD_BELOW


def points_count(grid: str, config) -> int:
    """How many points ``measure`` times per round (for a progress bar)."""
    batches, positions, prompts, _ = GRIDS[grid]
    one = ONE_THREAD_GRIDS[grid]
    return len(batches) * len(positions) + len(prompts) + 1 + (
        2 * (len(one[0]) * len(one[1]) + len(one[2])) if times_one_thread(config) else 0)


class Measurement:
    """A calibration's measurements, taken in rounds of every point.

    ``measure`` takes its rounds one after another. A benchmark may take them between other work instead
    (``benchmarks/simulator_accuracy.py`` takes one before each round of its measured runs), so that the
    calibration spans the same spell of a machine whose speed drifts.
    """

    def __init__(self, shape: ModelShape, grid: str = "full", repeats: int = 3) -> None:
        batches, positions, prompts, (moved, move_len) = GRIDS[grid]
        config = self.config = shape.config
        if max(positions) + 1 > config.n_ctx or max(prompts) > config.n_ctx or move_len > config.n_ctx:
            raise ValueError(f"calibration positions up to {max(positions)} need a context of more than {config.n_ctx}")
        self.calibration = Calibration(shape, threads=numba.get_num_threads(), load=(os.getloadavg()[0], 0.0),
                                       started=datetime.datetime.now().isoformat(timespec="minutes"))  # fmt: skip
        self.repeats, self.move = repeats, ("move", moved, move_len)
        weights = init_weights(config, seed=0)
        backend = NumpyBackend(config, weights, max(max(batches), 2 * moved))
        self.points = step_points(backend, batches, positions, prompts)
        src, dst = np.arange(moved), np.arange(moved, 2 * moved)
        self.points[self.move] = lambda: backend.move(src, dst, np.full(moved, move_len))
        self.one: dict = {}  # one-thread points, timed alone and beside busy neighbour processes
        if times_one_thread(config):
            one = NumpyBackend(config, weights, max(ONE_THREAD_GRIDS[grid][0]), threads=1)
            self.one = step_points(one, *ONE_THREAD_GRIDS[grid])
        self.times: dict = {}
        self.alone: dict = {}
        self.beside: dict = {}
        self.rounds = 0

    def round(self, progress: Callable[[], None] | None = None) -> None:
        time_round(self.points, self.times, self.repeats, progress)
        if self.one:
            time_round(self.one, self.alone, self.repeats, progress)
            with NeighbourProcesses(self.config, self.calibration.threads - 1):
                time_round(self.one, self.beside, self.repeats, progress)
        self.rounds += 1

    def result(self, rounds: range | None = None) -> Calibration:
        """The calibration from the rounds taken so far, or from those of ``rounds`` only (e.g. the two either
        side of a benchmark's run, to price it at the machine's speed of that spell)."""
        rounds = range(self.rounds) if rounds is None else rounds
        if not rounds or rounds.start < 0 or rounds.stop > self.rounds:
            raise ValueError(f"rounds {rounds} of the {self.rounds} taken")

        def taken(times: dict) -> dict:  # each round adds ``repeats`` calls of every point
            return {key: t[rounds.start * self.repeats : rounds.stop * self.repeats] for key, t in times.items()}

        config, best = self.config, medians(taken(self.times))
        c = dataclasses.replace(self.calibration, measured=measured_steps(best),
                                one_thread_alone=measured_steps(medians(taken(self.alone))),
                                one_thread=measured_steps(medians(taken(self.beside))))  # fmt: skip
        moved, move_len = self.move[1:]
        move_bytes = moved * move_len * 2 * config.n_layer * config.n_embd * 4  # K and V of every layer, fp32
        c.copy_bandwidth = 2 * move_bytes / best[self.move]
        c.lane_overhead_s = lane_overhead_s(config.vocab_size)
        c.load = (c.load[0], os.getloadavg()[0])
        return c


def measure(shape: ModelShape, grid: str = "full", rounds: int = 3, repeats: int = 3,
            progress: Callable[[], None] | None = None) -> Calibration:  # fmt: skip
    """Time the NumPy backend (batch-invariant kernels, random weights) on this machine."""
    measurement = Measurement(shape, grid, repeats)
    for _ in range(rounds):
        measurement.round(progress)
    return measurement.result()


def memory_gb() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass(frozen=True, slots=True)
class Fits:
    all_cores: CpuFit
    one_thread: CpuFit | None = None  # beside busy neighbours
    one_thread_alone: CpuFit | None = None


def one_thread_settings(c: Calibration, fits: Fits) -> list[tuple[str, CpuFit, list[Measured], str]]:
    """(figure suffix, fit, measurements, where) of each one-thread setting calibrated."""
    beside = (f"beside {c.threads - 1} busy neighbour process(es), each a one-thread instance with weights of its "
              "own, as concurrent instances run while all are busy")  # fmt: skip
    alone = "with the other cores idle, as an instance runs while the others wait"
    settings = [("_one_thread", fits.one_thread, c.one_thread, beside),
                ("_one_thread_alone", fits.one_thread_alone, c.one_thread_alone, alone)]  # fmt: skip
    return [s for s in settings if s[1] is not None]


def device_record(calibration: Calibration, fits: Fits, name: str = "cpu") -> dict:
    """The device file's contents: the fitted figures, each with its source, and the measurements."""
    c, fit = calibration, fits.all_cores
    how = (f"flover calibrate on {cpu_name()} ({os.cpu_count()} cores, {c.threads} Numba threads), {c.started}, "
           f"model shape {c.shape.name}, NumPy backend with batch-invariant kernels, fp32")  # fmt: skip
    fitted = f"fitted by {how}"
    peak = max(fit.matmul_rate, fit.attention_rate)
    errors = fit.errors(c.measured)
    figures = {
        "memory_gb": (round(memory_gb(), 1), "MemTotal in /proc/meminfo when calibrated"),
        "memory_bandwidth_gb_s": (fit.bandwidth / 1e9, f"{fitted}: the bandwidth the kernels reach (efficiency 1)"),
        "bandwidth_efficiency": (1.0, "the fitted bandwidth is already what the kernels reach"),
        "peak_tflops_fp32": (peak / 1e12, f"{fitted}: the faster of the matmul and attention rates"),
        "compute_efficiency": (fit.matmul_rate / peak, f"{fitted}: the matmuls' rate over the peak"),
        "attention_efficiency": (fit.attention_rate / peak, f"{fitted}: the attention op's rate over the peak"),
        "overlap": (fit.overlap, f"{fitted}: the best of 0, 0.1, ..., 1"),
        "layer_overhead_s": (fit.layer_overhead_s, f"{fitted}: fixed cost per layer and step (thread wake-ups, calls)"),
        "lane_overhead_s": (c.lane_overhead_s, f"measured by {how}: a Lane and a greedy sample from [V] logits"),
        "copy_bandwidth_gb_s": (c.copy_bandwidth / 1e9, f"measured by {how}: a memory shuffle's copies"),
        "cores": (c.threads, f"the Numba threads of {how}"),
    }
    notes = []
    for suffix, one, measured, where in one_thread_settings(c, fits):
        on_one = f"fitted by {how}, on one thread {where}"
        figures |= {
            f"memory_bandwidth_gb_s{suffix}": (one.bandwidth / 1e9, f"{on_one}: the bandwidth"),
            f"matmul_tflops{suffix}": (one.matmul_rate / 1e12, f"{on_one}: the matmuls' rate"),
            f"attention_tflops{suffix}": (one.attention_rate / 1e12, f"{on_one}: the attention op's rate"),
            f"overlap{suffix}": (one.overlap, f"{on_one}: the best of 0, 0.1, ..., 1"),
            f"layer_overhead_s{suffix}": (one.layer_overhead_s, f"{on_one}: fixed cost per layer and step"),
        }
        e = np.abs(one.errors(measured))
        notes.append(f"One-thread fit error {where}, over {len(e)} steps: median {np.median(e):.1%}, worst {e.max():.1%}.")
    return {
        "name": name, "kind": "cpu", "dtype": "fp32", "description": f"{cpu_name()}, {os.cpu_count()} cores (calibrated)",
        "figures": {k: {"value": float(f"{v:.6g}"), "source": s} for k, (v, s) in figures.items()},
        "notes": [
            f"Calibrated {c.started}; load average {c.load[0]:.1f} before and {c.load[1]:.1f} after. Figures from a "
            "shared or busy machine are noisy: run `flover calibrate` again on a quiet one before trusting them.",
            f"Fit error over {len(errors)} steps: median {np.median(np.abs(errors)):.1%}, worst {np.abs(errors).max():.1%}.",
            *[f"The {name} did not show in the steps of {c.shape.name}: left at its floor." for name in fit.unmeasured()],
            *notes,
        ],
        "measurements": measurement_rows(c.measured, fit),
        **{f"measurements{suffix}": measurement_rows(measured, one)
           for suffix, one, measured, _ in one_thread_settings(c, fits)},
    }


def measurement_rows(measured: list[Measured], fit: CpuFit) -> list[dict]:
    return [{"kind": m.kind, "rows": m.shape.rows, "lanes": m.shape.lanes, "cached": m.shape.cached,
             "measured_s": float(f"{m.seconds:.6g}"), "modelled_s": float(f"{p:.6g}")}
            for m, p in zip(measured, fit.modelled)]  # fmt: skip


def calibrate(shape: ModelShape, grid: str = "full", rounds: int = 3, progress=None) -> tuple[Calibration, Fits]:
    """Measure, then fit every setting measured."""
    return fit_all(measure(shape, grid, rounds, progress=progress))


def fit_all(c: Calibration) -> tuple[Calibration, Fits]:
    """Fit every setting measured."""
    shape = c.shape
    one, alone = (fit_cpu(shape, m) if m else None for m in (c.one_thread, c.one_thread_alone))
    return c, Fits(fit_cpu(shape, c.measured), one, alone)
