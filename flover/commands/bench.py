"""``flover bench``: serve one trace under one policy, or all of them side by side; or replay it over HTTP
against a running server (``--url``), measured by streaming clients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from flover import plots
from flover.backends import BackendFactory
from flover.commands.common import add_model_flags, add_serving_flags, check_run_memory, make_trace, policies_of, shared_kv
from flover.launch import open_backend
from flover.loading import resolve
from flover.report import table
from flover.runner import RunResult, check_trace, run_policy, warm_up
from flover.slo import parse_goodput, serving_metrics, summary
from flover.trace import read_trace


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="serve a trace under a policy and report latency and throughput")
    add_model_flags(p)
    add_serving_flags(p)
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", default=[],
                   help="objectives for goodput, e.g. ttft:500 tpot:50 (e2el too): requests/s that met them all")
    http = p.add_argument_group("over HTTP (the policy is the server's; --model only shapes the trace)")
    http.add_argument("--url", help="replay the trace against this OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    http.add_argument("--served-model", help="the model name to send (default: the first GET /v1/models lists)")
    http.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take over HTTP")
    p.set_defaults(run=run)


def run(args) -> int:
    config, weights, _ = resolve(args.model, args.weights_seed)
    requests = read_trace(args.trace) if args.trace else make_trace(args, config)
    check_trace(config, requests)
    slo = parse_goodput(args.goodput)
    if args.url:
        return run_http(args, requests, slo)
    configs = policies_of(args)
    shapes = shared_kv(config, configs)
    check_run_memory(config, configs, shapes)
    if args.tp and any(pc.policy == "instances" for pc in configs):
        raise ValueError("the instances policy runs N model copies; it cannot run under --tp (one sharded model)")
    if args.tp and len(shapes) > 1:
        raise ValueError("under --tp one sharded backend serves every policy; run --kv paged on its own policy")
    factory = BackendFactory(args.backend, config, weights)
    runs = []
    with open_backend(args.backend, config, weights, shapes[0] if shapes else 1, tp=args.tp) as backend:
        if backend is None:  # a worker rank of a tensor-parallel job
            return 0
        warm_up(backend)
        comm_before = backend.comm_seconds() if hasattr(backend, "comm_seconds") else None
        for pc in configs:
            with tqdm(total=len(requests), desc=pc.label, unit="req", disable=True if args.quiet else None, leave=False) as bar:
                runs.append(run_policy(pc, factory, requests, on_finish=lambda _: bar.update(), backend=backend))
        for run_ in runs:
            run_.metrics.update(serving_metrics(run_.results, 0, run_.metrics["makespan_s"], slo))
        print(table(runs))
        for run_ in runs if slo else ():
            print(summary(run_.config.label, run_.metrics))
        if comm_before is not None:  # tensor parallel: time each rank spent in MPI calls while serving
            spent = backend.comm_seconds() - comm_before
            serving = sum(run.metrics["makespan_s"] for run in runs)
            print(f"communication over {len(spent)} ranks ({serving:.2f}s of serving): "
                  + ", ".join(f"rank {r} {s:.3f}s ({100 * s / serving:.1f}%)" for r, s in enumerate(spent)))  # fmt: skip
    write_outputs(args, runs, {"model": args.model or "default", "backend": args.backend, "tp": args.tp,
                               "requests": len(requests)})  # fmt: skip
    return 0


def run_http(args, requests, slo: dict[str, float]) -> int:
    from flover.http_run import http_run
    from flover.loadgen import served_model

    if args.policy != "fused" or args.tp:
        raise ValueError("with --url the server's policy and ranks serve the trace (flover serve --policy, --tp); "
                         f"drop {'--tp' if args.tp else '--policy ' + args.policy}")  # fmt: skip
    model = args.served_model or served_model(args.url)
    with tqdm(total=len(requests), desc=args.url, unit="req", disable=True if args.quiet else None, leave=False) as bar:
        run_, failures = http_run(args.url, requests, model, slo, args.timeout, on_finish=lambda _: bar.update())
    for failure in failures[:5]:
        print(f"request {failure.id!r} failed: {failure.error}")
    if not run_.results:
        print(f"flover: error: none of the {len(requests)} requests was answered in full", file=sys.stderr)
        return 1
    print(table([run_]))
    print(summary(run_.config.label, run_.metrics))
    write_outputs(args, [run_], {"url": args.url, "served_model": model, "requests": len(requests)})
    return 0 if not failures else 1


def write_outputs(args, runs: list[RunResult], extra: dict) -> None:
    if args.json_out:
        records = [run.as_json(extra) for run in runs]
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(records[0] if len(records) == 1 else records, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    if args.plot:
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        written = [plots.timeline(run, out / f"timeline_{i}_{run.config.policy}.png") for i, run in enumerate(runs)]
        written.append(plots.latency_cdfs(runs, out / "latency_cdf.png"))
        print("plots: " + ", ".join(str(p) for p in written))
