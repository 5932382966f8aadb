"""``flover simulate``: ``flover bench`` on a simulated device.

The engine, its schedulers and KV layouts run unchanged; the backend is
model-free and time comes from the cost model of ``--device`` (a device
file's figures) for ``--model``'s shape, split ``--tp`` ways over
``--nodes`` nodes. Table, JSON and plots are those of ``flover bench``, and
every title and header says "simulated on DEVICE".

KV memory is laid out by the engine, which counts a value as 4 bytes: so
``--kv-memory`` and the KV figures in the JSON count float32 values, and at
fp16 a budget holds twice the positions it would in float32. What must fit
the device (weights and KV memory at ``--dtype``, per rank) is checked before
anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from flover import plots
from flover.commands.common import add_serving_flags, make_trace, policies_of
from flover.report import table
from flover.runner import check_trace
from flover.sim.device import DEVICES, load_device
from flover.sim.run import Plan, check_fits, simulate
from flover.sim.shapes import DTYPE_BYTES, SHAPES, model_shape
from flover.trace import read_trace


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="serve a trace on a simulated device (real schedulers, modelled time)",
                       description=__doc__.partition("\n\n")[2].replace("``", ""))  # fmt: skip
    known = ", ".join(sorted(path.stem for path in DEVICES.glob("*.json")))
    p.add_argument("--device", required=True, help=f"{known}, or a device file (.json) such as `flover calibrate` writes")
    p.add_argument("--model", default="gpt2", help=f"a model shape: {', '.join(SHAPES)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (GPUs) serving the model")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks spread over (InfiniBand between them)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=None, help="default: the device file's")
    add_serving_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    plan = Plan(load_device(args.device), model_shape(args.model), args.tp, args.nodes, args.dtype or "")
    config = plan.shape.config
    requests = read_trace(args.trace) if args.trace else make_trace(args, config)
    check_trace(config, requests)
    configs = policies_of(args)
    for pc in configs:  # every policy checked before any runs
        check_fits(plan, pc)
    runs = []
    for pc in configs:
        with tqdm(total=len(requests), desc=pc.label, unit="req", disable=True if args.quiet else None, leave=False) as bar:
            runs.append(simulate(plan, pc, requests, on_finish=lambda _: bar.update()))
    print(table(runs, title=f"{plan.label}: {len(requests)} requests"))
    extra = {"model": args.model, "device": plan.device.name, "tp": args.tp, "nodes": args.nodes, "dtype": plan.dtype,
             "requests": len(requests)}  # fmt: skip
    if args.json_out:
        records = [{"simulated_on": plan.device.name, "simulation": plan.label, **run.as_json(extra)} for run in runs]
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(records[0] if len(records) == 1 else records, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    if args.plot:
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        written = [plots.timeline(run, out / f"timeline_{i}_{run.config.policy}.png", note=plan.label)
                   for i, run in enumerate(runs)]  # fmt: skip
        written.append(plots.latency_cdfs(runs, out / "latency_cdf.png", note=plan.label))
        print("plots: " + ", ".join(str(p) for p in written))
    return 0
