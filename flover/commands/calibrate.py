"""``flover calibrate``: measure this machine's step costs with the NumPy backend and write its device file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flover.sim.calibration import calibrate, device_record, one_thread_settings, points_count
from flover.sim.device import device_from_record
from flover.sim.shapes import model_shape
from reference.config import PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit this CPU's cost-model figures to measured steps; write a device file")
    p.add_argument("--model", default="gpt2", help=f"the preset to measure: {', '.join(PRESETS)}")
    p.add_argument("--output", default="cpu.json", help="the device file to write")
    p.add_argument("--name", default="cpu", help="the device's name in the file (what `--device` titles say)")
    p.add_argument("--quick", action="store_true", help="a small grid and one round (seconds on --model tiny)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every measurement; the median call counts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.model not in PRESETS:
        raise ValueError(f"calibrate measures a preset's random weights; choose one of {', '.join(PRESETS)}, "
                         f"got {args.model!r}")  # fmt: skip
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    shape = model_shape(args.model)
    grid, rounds = ("quick", 1) if args.quick else ("full", args.rounds)
    points = points_count(grid, shape.config) * rounds
    with tqdm(total=points, desc=f"measuring {args.model}", unit="point", disable=True if args.quiet else None,
              leave=False) as bar:  # fmt: skip
        calibration, fits = calibrate(shape, grid, rounds, progress=bar.update)
    record, fit = device_record(calibration, fits, args.name), fits.all_cores
    device_from_record(record)  # what simulate will load must load
    errors = fit.errors(calibration.measured)
    print(f"{'step':<8} {'rows':>5} {'lanes':>5} {'cached':>7} {'measured':>10} {'modelled':>10} {'error':>7}")
    for m, modelled, error in zip(calibration.measured, fit.modelled, errors):
        s = m.shape
        print(f"{m.kind:<8} {s.rows:>5} {s.lanes:>5} {s.cached:>7} {m.seconds * 1e3:>8.2f}ms {modelled * 1e3:>8.2f}ms "
              f"{error:>+7.1%}")  # fmt: skip
    rate = fit.matmul_rate / 1e9
    print(f"fit: {fit.bandwidth / 1e9:.1f} GB/s, matmuls {rate:.1f} GFLOP/s, overlap {fit.overlap:g}, "
          f"{fit.layer_overhead_s * 1e3:.3f} ms a layer; host {calibration.lane_overhead_s * 1e6:.1f} us a lane; "
          f"copies {calibration.copy_bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"fit error: median {np.median(np.abs(errors)):.1%}, worst {np.abs(errors).max():.1%} over {len(errors)} steps "
          f"(load average {calibration.load[0]:.1f} before, {calibration.load[1]:.1f} after)")  # fmt: skip
    for suffix, one, measured, _ in one_thread_settings(calibration, fits):
        e = np.abs(one.errors(measured))
        where = "alone" if suffix.endswith("alone") else f"beside {calibration.threads - 1} busy instance(s)"
        print(f"on one thread, {where} (each of {calibration.threads} concurrent instances): "
              f"{one.bandwidth / 1e9:.1f} GB/s, matmuls {one.matmul_rate / 1e9:.1f} GFLOP/s, "
              f"{one.layer_overhead_s * 1e3:.3f} ms a layer; fit error median {np.median(e):.1%}, worst {e.max():.1%} "
              f"over {len(e)} steps")  # fmt: skip
    for name in fit.unmeasured():
        print(f"note: the {name} did not show in {args.model}'s steps and is left at its floor; "
              f"a larger --model measures it")  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
