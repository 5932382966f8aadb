"""Devices as data files: each figure with the place it came from.

A device file (JSON) is::

    {"name": "a100-80gb", "kind": "gpu", "dtype": "fp16", "description": "...",
     "figures": {"memory_bandwidth_gb_s": {"value": 2039, "source": "NVIDIA A100 datasheet ..."}, ...},
     "notes": [...], "measurements": [...]}

Every figure is a number with a source: a specification sheet by name, a
fit (and to what), a measurement (when and how), or "assumed" with the
reason. ``notes`` and ``measurements`` are free text and data for a reader.
The files of the devices flover knows lie in ``flover/sim/devices/``;
``--device`` takes one of their names or the path of a file of your own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from flover.sim.shapes import DTYPE_BYTES

DEVICES = Path(__file__).resolve().parent / "devices"

# name -> (lowest, highest) allowed value; a figure outside its range is a typo or a wrong unit
REQUIRED = {
    "memory_gb": (1e-3, 1e5),  # per device (GPU) or machine (CPU), decimal GB as spec sheets count
    "memory_bandwidth_gb_s": (1e-3, 1e6),  # GB/s
    "bandwidth_efficiency": (1e-6, 1.0),  # the share of the bandwidth a step's kernels reach
    "compute_efficiency": (1e-6, 1.0),  # the share of the peak FLOP rate a step's matmuls reach
    "overlap": (0.0, 1.0),  # 1: an op takes max(memory, math) (roofline); 0: their sum
    "layer_overhead_s": (0.0, 1.0),  # fixed cost per layer per step: kernel launches, synchronisation
}
OPTIONAL = {
    "peak_tflops_fp16": (1e-6, 1e6),
    "peak_tflops_bf16": (1e-6, 1e6),
    "peak_tflops_fp32": (1e-6, 1e6),
    "attention_efficiency": (1e-6, 1.0),  # the attention op's share of the peak, when it differs from a matmul's
    "lane_overhead_s": (0.0, 1.0),  # fixed cost per lane per step: sampling and bookkeeping on the host
    "copy_bandwidth_gb_s": (1e-3, 1e6),  # the memory shuffle's copies (bytes read + written); else the memory's
    "gpus_per_node": (1, 1024),
    "nvlink_gb_s": (1e-3, 1e6),  # NVLink per GPU, both directions together, as spec sheets give it
    "nvlink_latency_s": (0.0, 1.0),  # per hop of a ring
    "infiniband_gb_s": (1e-3, 1e6),  # InfiniBand per GPU, one direction
    "infiniband_latency_s": (0.0, 1.0),
    # A CPU's cores, and its figures when a step runs on one of them (``Device.with_threads``): concurrent
    # instances on a CPU each get cores / N threads, where a GPU's instances time-share the whole device.
    # ``_one_thread``: beside busy neighbours (all instances busy); ``_one_thread_alone``: the other cores idle.
    "cores": (1, 4096),
}
ONE_THREAD_BASES = {"memory_bandwidth_gb_s": (1e-3, 1e6), "matmul_tflops": (1e-9, 1e6),
                    "attention_tflops": (1e-9, 1e6), "overlap": (0.0, 1.0), "layer_overhead_s": (0.0, 1.0)}  # fmt: skip
ONE_THREAD = tuple(f"{base}_one_thread" for base in ONE_THREAD_BASES)
ONE_THREAD_ALONE = tuple(f"{base}_one_thread_alone" for base in ONE_THREAD_BASES)
OPTIONAL |= {f"{base}{end}": limits for base, limits in ONE_THREAD_BASES.items() for end in ("_one_thread", "_one_thread_alone")}


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    kind: str  # gpu or cpu
    dtype: str  # the data type a model runs in on it by default
    figures: dict[str, float]
    sources: dict[str, str]
    description: str = ""

    def figure(self, name: str, default: float | None = None) -> float:
        if name in self.figures:
            return self.figures[name]
        if default is None:
            raise ValueError(f"device {self.name} has no figure {name!r}")
        return default

    def peak_flops(self, dtype: str) -> float:
        key = f"peak_tflops_{dtype}"
        if key not in self.figures:
            have = sorted(k.removeprefix("peak_tflops_") for k in self.figures if k.startswith("peak_tflops_"))
            raise ValueError(f"device {self.name} has no {dtype} peak; it has {', '.join(have) or 'none'}")
        return self.figures[key] * 1e12

    def has(self, *names: str) -> bool:
        return all(n in self.figures for n in names)

    def with_threads(self, threads: int, alone: bool = False) -> Device:
        """This CPU when a step gets ``threads`` of its cores: itself, or figures between its one-thread ones
        and its all-core ones. The one-thread end: beside busy neighbours, or ``alone`` (the other cores idle)
        where the device has those figures.

        Each time a figure stands for (seconds per byte, per FLOP, per layer) is taken as a + b / threads
        (Amdahl's law: a serial part and a part split over the threads), the line through the two calibrated
        ends. A GPU, or a CPU calibrated without one-thread figures, is itself at any thread count.
        """
        cores = int(self.figure("cores", 1))
        ends = ONE_THREAD_ALONE if alone and self.has(*ONE_THREAD_ALONE) else ONE_THREAD
        if self.kind != "cpu" or not self.has(*ends) or threads >= cores:
            return self
        w = (1 - 1 / max(threads, 1)) / (1 - 1 / cores)  # 0 at one thread, 1 at every core

        def between(one: float, every: float) -> float:
            return one + w * (every - one)

        f, peak = self.figures, self.peak_flops("fp32")
        one = dict(zip(ONE_THREAD_BASES, (f[name] for name in ends)))
        bandwidth = f["memory_bandwidth_gb_s"] * f["bandwidth_efficiency"]
        per_byte = between(1 / one["memory_bandwidth_gb_s"], 1 / bandwidth)
        per_matmul = between(1 / one["matmul_tflops"], 1 / (peak / 1e12 * f["compute_efficiency"]))
        attention = peak / 1e12 * f.get("attention_efficiency", f["compute_efficiency"])
        per_attention = between(1 / one["attention_tflops"], 1 / attention)
        rates = (1 / per_matmul, 1 / per_attention)
        kept = {k: v for k, v in f.items() if k not in ONE_THREAD + ONE_THREAD_ALONE}
        figures = {**kept, "memory_bandwidth_gb_s": 1 / per_byte, "bandwidth_efficiency": 1.0,
                   "peak_tflops_fp32": max(rates), "compute_efficiency": rates[0] / max(rates),
                   "attention_efficiency": rates[1] / max(rates),
                   "overlap": between(one["overlap"], f["overlap"]),
                   "layer_overhead_s": between(one["layer_overhead_s"], f["layer_overhead_s"]), "cores": threads}
        end = "alone" if ends is ONE_THREAD_ALONE else "beside busy neighbours"
        how = f"between the one-thread ({end}) and the {cores}-core figures, at {threads} threads"
        sources = {k: s for k, s in self.sources.items() if k not in ONE_THREAD + ONE_THREAD_ALONE}
        sources |= {k: how for k in figures if figures[k] != f.get(k)}
        return Device(self.name, self.kind, self.dtype, figures, sources, self.description)


def device_path(name_or_file: str) -> Path:
    """A known device's file, or the path given."""
    path = Path(name_or_file)
    if path.suffix == ".json" or path.is_file():
        return path
    known = DEVICES / f"{name_or_file}.json"
    if not known.is_file():
        names = sorted(p.stem for p in DEVICES.glob("*.json"))
        raise ValueError(f"unknown device {name_or_file!r}; choose one of {', '.join(names)} or a device file (.json)")
    return known


def load_device(name_or_file: str) -> Device:
    path = device_path(name_or_file)
    if not path.is_file():
        raise ValueError(f"device file {str(path)!r} does not exist")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as bad:
        raise ValueError(f"device file {path}: not JSON ({bad})") from None
    try:
        return device_from_record(record)
    except ValueError as bad:
        raise ValueError(f"device file {path}: {bad}") from None


def device_from_record(record) -> Device:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with name, kind, dtype and figures")
    for key in ("name", "kind", "dtype"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"{key!r} must be a non-empty string, got {record.get(key)!r}")
    if record["kind"] not in ("gpu", "cpu"):
        raise ValueError(f"kind must be gpu or cpu, got {record['kind']!r}")
    if record["dtype"] not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {record['dtype']!r}")
    entries = record.get("figures")
    if not isinstance(entries, dict):
        raise ValueError("'figures' must be an object of {name: {value, source}}")
    figures, sources = {}, {}
    for name, entry in entries.items():
        limits = REQUIRED.get(name) or OPTIONAL.get(name)
        if limits is None:
            raise ValueError(f"unknown figure {name!r}; known: {', '.join([*REQUIRED, *OPTIONAL])}")
        if not isinstance(entry, dict) or set(entry) != {"value", "source"}:
            raise ValueError(f"figure {name!r} must be {{\"value\": number, \"source\": text}}, got {entry!r}")
        value, source = entry["value"], entry["source"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"figure {name!r} must be a finite number, got {value!r}")
        if not limits[0] <= value <= limits[1]:
            raise ValueError(f"figure {name!r} = {value:g} is outside {limits[0]:g}..{limits[1]:g}")
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"figure {name!r} needs a source: where the number came from")
        figures[name], sources[name] = float(value), source
    missing = [name for name in REQUIRED if name not in figures]
    if missing:
        raise ValueError(f"missing figure {missing[0]!r}")
    device = Device(record["name"], record["kind"], record["dtype"], figures, sources, record.get("description", ""))
    device.peak_flops(record["dtype"])  # its own dtype must have a peak
    return device
