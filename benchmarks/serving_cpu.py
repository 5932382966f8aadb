"""Serving on the CPU: the four policies on one Poisson trace of the gpt2 shape.

    python benchmarks/serving_cpu.py                 # the full run written to RESULTS.md
    python benchmarks/serving_cpu.py --quick         # a smoke run on the tiny preset

Per rate: fused (with and without the memory shuffle), serial, dynamic
batching at several batch sizes and windows and concurrent instances at 2
and 4, all on the same trace in wall-clock time. Fused and dynamic run the
batch-invariant kernels; serial and instances run whichever path is faster at
batch 1 (measured here first), so no ratio is flattered. The two fused runs
go first and again last, in reverse order, and their figures are the mean of
both, so neither gains from running on a cooler or warmer machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
import reference  # noqa: E402, F401  (first: it sets the thread settings NumPy's BLAS reads as it loads)
import numpy as np  # noqa: E402
# isort: on

from benchmarks.results_file import machine, today, write_section  # noqa: E402
from flover.backends import make_backend  # noqa: E402
from flover.runner import PolicyConfig, check_trace, run_policy, warm_up  # noqa: E402
from flover.trace import poisson_trace  # noqa: E402
from reference import init_weights, preset  # noqa: E402


def step_ms(backend, batch: int, position: int = 64, repeats: int = 5) -> float:
    slots, tokens, positions = np.arange(batch), np.zeros(batch, np.int64), np.full(batch, position)
    backend.decode(slots, tokens, positions)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.decode(slots, tokens, positions)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", default="16:64")
    p.add_argument("--output-len", default="32:128")
    p.add_argument("--rates", default="2,6,64", help="low, middle and saturating arrival rates (requests/s)")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-batches", default="8,32", help="dynamic batching: largest batch sizes to try")
    p.add_argument("--windows-ms", default="50,500", help="dynamic batching: windows to try")
    p.add_argument("--instances", default="2,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny preset, 12 requests: checks the script runs")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    if args.quick:
        args.model, args.requests, args.prompt_len, args.output_len, args.rates = "tiny", 12, "4:8", "4:12", "200"
        args.slots, args.max_batches, args.windows_ms, args.instances, args.no_write = 4, "4", "20", "2", True

    config = preset(args.model)
    weights = init_weights(config, seed=0)
    fast = {name: make_backend(name, config, weights, 1) for name in ("numpy", "numpy-blas")}
    for b in fast.values():
        warm_up(b, config)
    solo = {name: np.inf for name in fast}
    for _ in range(3):  # rounds in turn, best of each, so a noisy moment cannot pick the slower path
        for name, b in fast.items():
            solo[name] = min(solo[name], step_ms(b, 1, repeats=10))
    baseline = min(solo, key=solo.get)
    print(f"batch-1 decode step: invariant {solo['numpy']:.1f} ms, BLAS {solo['numpy-blas']:.1f} ms -> "
          f"serial and instances use {baseline}")  # fmt: skip
    del fast

    fused_backend = make_backend("numpy", config, weights, args.slots)
    warm_up(fused_backend, config)
    serial_backend = make_backend(baseline, config, weights, 1)
    warm_up(serial_backend, config)
    invariant = lambda n: make_backend("numpy", config, weights, n)  # noqa: E731
    solo_factory = lambda n: make_backend(baseline, config, weights, n)  # noqa: E731

    fused = [(PolicyConfig("fused", slots=args.slots, shuffle=shuffle), invariant, fused_backend) for shuffle in (True, False)]
    plans = [(PolicyConfig("serial"), solo_factory, serial_backend)]
    plans += [(PolicyConfig("dynamic", max_batch=int(b), window_s=float(w) / 1e3), invariant, fused_backend)
              for b in args.max_batches.split(",") if int(b) <= args.slots for w in args.windows_ms.split(",")]  # fmt: skip
    plans += [(PolicyConfig("instances", instances=int(n)), solo_factory, None) for n in args.instances.split(",")]
    plans = fused + plans + fused[::-1]  # fused first and last, in turn

    lengths = [tuple(int(v) for v in text.split(":")) for text in (args.prompt_len, args.output_len)]
    sections = []
    for rate in [float(r) for r in args.rates.split(",")]:
        trace = poisson_trace(rate, args.requests, lengths[0], lengths[1], seed=args.seed, vocab_size=config.vocab_size)
        check_trace(config, trace)
        runs = []
        for pc, factory, backend in plans:
            with tqdm(total=len(trace), desc=f"rate {rate:g}: {pc.label}", unit="req", leave=False) as bar:
                runs.append(run_policy(pc, factory, trace, on_finish=lambda _: bar.update(), backend=backend))
        tokens = {r.id: r.tokens for r in runs[0].results}
        same = [run.config.label for run in runs if {r.id: r.tokens for r in run.results} == tokens]
        sections.append(report(rate, runs, len(same) == len(runs)))
        print(sections[-1], flush=True)

    body = "\n\n".join(sections)
    header = (f"## Serving on the CPU ({args.model} shape, {args.requests} Poisson requests)\n\n"
              f"Command: `python benchmarks/serving_cpu.py` (prompts {args.prompt_len}, outputs {args.output_len} "
              f"tokens, fused with {args.slots} slots, dynamic at batch sizes {args.max_batches} and windows "
              f"{args.windows_ms} ms). Machine: {machine()}. Date: {today()}.\n\n"
              f"Batch-1 decode step measured first: invariant kernels {solo['numpy']:.1f} ms, BLAS "
              f"{solo['numpy-blas']:.1f} ms, so serial and instances ran on `{baseline}`.\n\n")  # fmt: skip
    if not args.no_write:
        write_section("serving_cpu", header + body)
        print("wrote benchmarks/RESULTS.md")


def mean_run(runs) -> dict:
    """Metrics averaged over repeated runs of one configuration (the fused pair)."""
    keys = ("throughput_tok_s", "mean_batch", "decode_s", "wasted_lanes", "lanes")
    out = {k: float(np.mean([r.metrics[k] for r in runs])) for k in keys}
    for k in ("latency_s", "ttft_s", "returned_latency_s"):
        out[k] = {q: float(np.mean([r.metrics[k][q] for r in runs])) for q in ("mean", "p99")}
    return out


def report(rate: float, runs, identical: bool) -> str:
    fused, unshuffled = (mean_run([r for r in runs if r.config.policy == "fused" and r.config.shuffle == s])
                         for s in (True, False))  # fmt: skip
    moves = [r.stats.moves for r in runs if r.config.policy == "fused" and r.config.shuffle]
    others = [r for r in runs if r.config.policy != "fused"]
    dynamic = min((r for r in others if r.config.policy == "dynamic"), key=lambda r: r.metrics["latency_s"]["mean"])
    returned = min((r for r in others if r.config.policy == "dynamic"),
                   key=lambda r: r.metrics["returned_latency_s"]["mean"])  # fmt: skip
    instances = min((r for r in others if r.config.policy == "instances"), key=lambda r: r.metrics["latency_s"]["mean"])
    serial = next(r for r in others if r.config.policy == "serial")
    lines = [f"### {rate:g} requests/s", "",
             "| policy | tok/s | mean latency (s) | p99 latency (s) | mean latency, returned whole (s) | mean TTFT (s) "
             "| mean batch | idle rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    rows = [(f"fused (slots {runs[0].config.slots}), mean of 2 runs", fused),
            ("fused, no shuffle, mean of 2 runs", unshuffled)]  # fmt: skip
    rows += [(r.config.label + (" (best)" if r in (dynamic, instances) else ""), r.metrics) for r in others]
    for label, m in rows:
        lines.append(f"| {label} | {m['throughput_tok_s']:.1f} | {m['latency_s']['mean']:.2f} | {m['latency_s']['p99']:.2f} "
                     f"| {m['returned_latency_s']['mean']:.2f} | {m['ttft_s']['mean']:.2f} | {m['mean_batch']:.1f} "
                     f"| {m['wasted_lanes'] / max(m['lanes'], 1):.0%} |")  # fmt: skip
    f_lat = fused["latency_s"]["mean"]
    lines += ["",
              f"- fused throughput / serial: **{fused['throughput_tok_s'] / serial.metrics['throughput_tok_s']:.2f}x**",
              f"- best dynamic mean latency / fused: **{dynamic.metrics['latency_s']['mean'] / f_lat:.2f}x**"
              f" ({dynamic.config.label}, each request timed to its own last token, as if streamed)",
              f"- best dynamic returning each batch whole (Triton without streaming) / fused: "
              f"**{returned.metrics['returned_latency_s']['mean'] / f_lat:.2f}x** ({returned.config.label})",
              f"- best instances mean latency / fused: **{instances.metrics['latency_s']['mean'] / f_lat:.2f}x**"
              f" ({instances.config.label})",
              f"- memory shuffle: {np.mean(moves):.0f} slot moves per run; without it the fused step computed "
              f"{unshuffled['wasted_lanes']:.0f} hole rows ({unshuffled['wasted_lanes'] / unshuffled['lanes']:.0%} of "
              f"its rows) and spent {unshuffled['decode_s']:.1f} s in decode steps against {fused['decode_s']:.1f} s with it; "
              f"throughput {fused['throughput_tok_s'] / unshuffled['throughput_tok_s']:.2f}x, mean latency "
              f"{unshuffled['latency_s']['mean'] / f_lat:.2f}x lower with the shuffle",
              f"- token-identical to fused: {'every run' if identical else 'NOT every run'}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
