"""``flover sweep``: the policies over a list of arrival rates; latency and throughput against load."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from flover import plots
from flover.backends import BackendFactory
from flover.commands.common import (
    add_model_flags,
    add_policy_flags,
    add_trace_flags,
    check_run_memory,
    make_trace,
    policy_config,  # fmt: skip
    shared_kv,
)
from flover.loading import resolve
from flover.report import table
from flover.runner import check_trace, run_policy, warm_up


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--rates must be positive, got {text!r}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run the policies over several arrival rates and plot against load")
    add_model_flags(p)
    p.add_argument("--rates", default="1,2,4,8", help="arrival rates in requests/s, comma separated")
    p.add_argument("--policies", default="fused,serial,dynamic,instances")
    add_policy_flags(p)
    add_trace_flags(p, with_rate=False)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot", help="directory for sweep.png")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.tp:
        raise ValueError("flover sweep runs in one process; use flover bench --tp under mpiexec")
    rates = float_list(args.rates)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    configs = [policy_config(args, name) for name in names]
    config, weights, _ = resolve(args.model, args.weights_seed)
    shapes = shared_kv(config, configs)
    check_run_memory(config, configs, shapes)
    factory = BackendFactory(args.backend, config, weights)
    backend = factory(shapes[0]) if shapes else None
    if backend is not None:
        warm_up(backend)
    curves: dict[str, list[dict]] = {pc.label: [] for pc in configs}
    with tqdm(total=len(rates) * len(configs) * args.requests, unit="req", desc="sweep") as bar:
        for rate in rates:
            requests = make_trace(args, config, rate)
            check_trace(config, requests)
            runs = [run_policy(pc, factory, requests, on_finish=lambda _: bar.update(), backend=backend)
                    for pc in configs]  # fmt: skip
            for run in runs:
                curves[run.config.label].append(run.metrics)
            tqdm.write(f"\nrate {rate:g} requests/s\n{table(runs)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rates": rates, "metrics": curves}, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    if args.plot:
        Path(args.plot).mkdir(parents=True, exist_ok=True)
        print(f"plot: {plots.sweep_curves(rates, curves, Path(args.plot) / 'sweep.png')}")
    return 0
