"""Serving on the CPU, gpt2 shape: KV layouts under one budget, chunked against alone prefill, the four policies.

    python benchmarks/serving_cpu.py            # the full run, written to RESULTS.md
    python benchmarks/serving_cpu.py --quick    # tiny preset: checks the script runs

Three experiments, each on one Poisson trace with variable output lengths,
every policy replaying the same trace in wall-clock time:

1. layouts, one KV budget (``--budget-slots`` full-context slots' worth of
   memory): Flover's slots with the memory shuffle, slots without it (a hole
   is computed at its departed request's last length, as in Flover's
   contiguous batch), and vLLM-style paged blocks, which fit more requests
   in the same memory;
2. prefill, on longer prompts: every prompt in a step of its own (Flover)
   against chunks piggybacked on the decode steps (Sarathi, vLLM);
3. policies: serial, instances (N processes, each with its own weights and
   1/N of the cores, as Triton's instances are separate contexts), dynamic
   batching and fused, at a saturating rate.

Within an experiment the runs take turns in two rounds, the second in
reverse order, and each figure is the mean of both, so no run gains from a
cooler or warmer machine. Serial and instances decode on whichever path is
faster at batch 1 (measured first), so no ratio is flattered.
"""

from __future__ import annotations

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

ARGS_PARSER = harness.parser(__doc__, quick="tiny preset, 12 requests: checks the script runs")
ARGS_PARSER.add_argument("--model", default="gpt2")
ARGS_PARSER.add_argument("--requests", type=int, default=64)
ARGS_PARSER.add_argument("--budget-slots", type=int, default=8, help="layouts: the KV budget, in full-context slots")
ARGS_PARSER.add_argument("--block-size", type=int, default=16, help="layouts: positions per paged block")
ARGS_PARSER.add_argument("--slots", type=int, default=32, help="prefill and policies: fused slots, dynamic's batch")
ARGS_PARSER.add_argument("--chunks", default="256,64", help="prefill: chunk budgets (tokens per step) to try")
ARGS_PARSER.add_argument("--instances", type=int, default=2)
ARGS_PARSER.add_argument("--seed", type=int, default=0)
ARGS = ARGS_PARSER.parse_args()
harness.start()

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flover.backends import BackendFactory  # noqa: E402
from flover.runner import PolicyConfig, RunResult, check_trace, fits, run_policy, warm_up  # noqa: E402
from flover.trace import poisson_trace  # noqa: E402
from reference import init_weights, preset  # noqa: E402

GIB = 2**30
# (rate, requests, prompt lengths, output lengths) of each experiment's trace
TRACES = {
    "layouts": (64.0, 0.5, (16, 64), (32, 128)),
    "prefill": (4.0, 0.375, (64, 192), (16, 64)),
    "policies": (64.0, 0.375, (16, 64), (16, 64)),
}
QUICK_TRACES = {name: (200.0, 1.0, (4, 8), (4, 24)) for name in TRACES}


class Runner:
    """Runs policies on shared, warm backends: one per KV shape, plus the batch-1 path for serial."""

    def __init__(self, config, weights, solo: str) -> None:
        self.factories = {name: BackendFactory(name, config, weights) for name in ("numpy", solo)}
        self.solo = solo
        self.backends = []

    def backend(self, pc: PolicyConfig):
        if pc.policy == "instances":
            return None
        name = self.solo if pc.policy == "serial" else "numpy"
        shape = pc.layout(self.factories[name].config).shape
        for b_name, backend in self.backends:
            if b_name == name and fits(backend.kv, shape):
                return backend
        backend = self.factories[name](shape)
        warm_up(backend)
        self.backends.append((name, backend))
        return backend

    def rounds(self, plans: list[PolicyConfig], trace, title: str) -> dict[str, list[RunResult]]:
        """Every plan twice, the second round in reverse order; label -> its runs."""
        runs: dict[str, list[RunResult]] = {pc.label: [] for pc in plans}
        for pc in plans + plans[::-1]:
            factory = self.factories[self.solo if pc.policy in ("serial", "instances") else "numpy"]
            with tqdm(total=len(trace), desc=f"{title}: {pc.label}", unit="req", leave=False) as bar:
                runs[pc.label].append(run_policy(pc, factory, trace, on_finish=lambda _: bar.update(),
                                                 backend=self.backend(pc)))  # fmt: skip
        return runs


def mean(runs: list[RunResult], key: str, q: str | None = None) -> float:
    return float(np.mean([r.metrics[key][q] if q else r.metrics[key] for r in runs]))


def same_tokens(runs: dict[str, list[RunResult]]) -> bool:
    tokens = [{r.id: r.tokens for r in run.results} for group in runs.values() for run in group]
    return all(t == tokens[0] for t in tokens)


def layouts(runner: Runner, config, trace) -> str:
    budget_gib = ARGS.budget_slots * config.n_ctx * 2 * config.n_layer * config.n_embd * 4 / GIB
    plans = [PolicyConfig("fused", kv_memory_gib=budget_gib, shuffle=True),
             PolicyConfig("fused", kv_memory_gib=budget_gib, shuffle=False),
             PolicyConfig("fused", kv_memory_gib=budget_gib, kv="paged", block_size=ARGS.block_size)]  # fmt: skip
    runs = runner.rounds(plans, trace, "layouts")
    lines = ["| layout | requests it fits | tok/s | mean latency (s) | p99 latency (s) | mean batch | idle rows "
             "| moves | preemptions | KV in use, mean (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for pc in plans:
        group, shape = runs[pc.label], pc.layout(config).shape
        fit = shape.n_slots(config) if pc.kv == "slots" else f"{shape.n_blocks} blocks"
        idle = mean(group, "idle_rows") / max(mean(group, "rows"), 1)
        lines.append(f"| {pc.label} | {fit} | {mean(group, 'throughput_tok_s'):.1f} | {mean(group, 'latency_s', 'mean'):.2f} "
                     f"| {mean(group, 'latency_s', 'p99'):.2f} | {mean(group, 'mean_batch'):.1f} | {idle:.0%} "
                     f"| {mean(group, 'moves'):.0f} | {mean(group, 'preemptions'):.0f} "
                     f"| {mean(group, 'kv_mean_bytes') / GIB:.2f} of {budget_gib:.2f} |")  # fmt: skip
    slots, holes, paged = (runs[pc.label] for pc in plans)
    tput = lambda g: mean(g, "throughput_tok_s")  # noqa: E731
    lat = lambda g: mean(g, "latency_s", "mean")  # noqa: E731
    lines += ["",
              f"- the shuffle: **{tput(slots) / tput(holes):.2f}x** the throughput and **{lat(holes) / lat(slots):.2f}x** "
              f"lower mean latency than computing the holes ({mean(holes, 'decode_s'):.1f} s against "
              f"{mean(slots, 'decode_s'):.1f} s in decode steps)",
              f"- paged against slots with the shuffle, same memory: **{tput(paged) / tput(slots):.2f}x** the "
              f"throughput, **{lat(slots) / lat(paged):.2f}x** lower mean latency, mean batch "
              f"{mean(paged, 'mean_batch'):.1f} against {mean(slots, 'mean_batch'):.1f}",
              f"- token-identical across layouts and rounds: {'yes' if same_tokens(runs) else 'NO'}"]  # fmt: skip
    return "\n".join(lines)


def prefill(runner: Runner, trace) -> str:
    plans = [PolicyConfig("fused", slots=ARGS.slots)]
    plans += [PolicyConfig("fused", slots=ARGS.slots, prefill="chunked", chunk_tokens=int(c)) for c in ARGS.chunks.split(",")]
    runs = runner.rounds(plans, trace, "prefill")
    lines = ["| prefill | tok/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | mean latency (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for pc in plans:
        g = runs[pc.label]
        lines.append(f"| {pc.label} | {mean(g, 'throughput_tok_s'):.1f} | {mean(g, 'ttft_s', 'p50'):.2f} "
                     f"| {mean(g, 'ttft_s', 'p99'):.2f} | {1e3 * mean(g, 'tpot_s', 'p50'):.1f} "
                     f"| {1e3 * mean(g, 'tpot_s', 'p99'):.1f} | {mean(g, 'latency_s', 'mean'):.2f} |")  # fmt: skip
    alone, chunked = runs[plans[0].label], runs[plans[1].label]
    lines += ["",
              f"- {plans[1].label} against alone: TPOT p99 "
              f"**{mean(alone, 'tpot_s', 'p99') / mean(chunked, 'tpot_s', 'p99'):.2f}x** lower, TTFT p99 "
              f"{mean(alone, 'ttft_s', 'p99') / mean(chunked, 'ttft_s', 'p99'):.2f}x lower "
              f"(below 1: higher)",
              f"- token-identical across prefill modes and rounds: {'yes' if same_tokens(runs) else 'NO'}"]  # fmt: skip
    return "\n".join(lines)


def policies(runner: Runner, trace) -> str:
    plans = [PolicyConfig("serial"), PolicyConfig("instances", instances=ARGS.instances),
             PolicyConfig("dynamic", max_batch=ARGS.slots, queue_delay_s=0.05),
             PolicyConfig("fused", slots=ARGS.slots)]  # fmt: skip
    runs = runner.rounds(plans, trace, "policies")
    serial, fused = runs[plans[0].label], runs[plans[-1].label]
    lines = ["| policy | tok/s | x serial | mean latency (s) | p99 latency (s) | mean latency, returned whole (s) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for pc in plans:
        g = runs[pc.label]
        lines.append(f"| {pc.label} | {mean(g, 'throughput_tok_s'):.1f} "
                     f"| {mean(g, 'throughput_tok_s') / mean(serial, 'throughput_tok_s'):.2f} "
                     f"| {mean(g, 'latency_s', 'mean'):.2f} | {mean(g, 'latency_s', 'p99'):.2f} "
                     f"| {mean(g, 'returned_latency_s', 'mean'):.2f} |")  # fmt: skip
    lat = lambda g: mean(g, "latency_s", "mean")  # noqa: E731
    lines += ["",
              "- fused against each, mean latency: " + ", ".join(f"{pc.label} **{lat(runs[pc.label]) / lat(fused):.2f}x**"
                                                                 for pc in plans[:-1]),
              f"- token-identical across policies and rounds: {'yes' if same_tokens(runs) else 'NO'}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if ARGS.quick:
        ARGS.model, ARGS.requests, ARGS.slots, ARGS.chunks, ARGS.no_write = "tiny", 12, 4, "8", True
        ARGS.budget_slots, ARGS.block_size = 2, 8
    config = preset(ARGS.model)
    weights = init_weights(config, seed=0)
    solo_backends = {name: BackendFactory(name, config, weights)(1) for name in ("numpy", "numpy-blas")}
    for b in solo_backends.values():
        warm_up(b)
    step_s = harness.best_of_rounds({name: lambda b=b: harness.median_s(harness.decode_step(b, 1, 64), 10)
                                     for name, b in solo_backends.items()}, 3)  # fmt: skip
    solo = min(step_s, key=step_s.get)
    print(f"batch-1 decode step: invariant {1e3 * step_s['numpy']:.1f} ms, BLAS {1e3 * step_s['numpy-blas']:.1f} ms "
          f"-> serial and instances use {solo}")  # fmt: skip
    del solo_backends
    runner = Runner(config, weights, solo)
    sections = []
    for name, experiment in (("layouts", layouts), ("prefill", prefill), ("policies", policies)):
        rate, share, prompts, outputs = (QUICK_TRACES if ARGS.quick else TRACES)[name]
        n = max(2, int(ARGS.requests * share))
        trace = poisson_trace(rate, n, prompts, outputs, seed=ARGS.seed, vocab_size=config.vocab_size)
        check_trace(config, trace)
        table = experiment(runner, config, trace) if name == "layouts" else experiment(runner, trace)
        heading = (f"### {name}: {n} requests at {rate:g}/s, prompts {prompts[0]}..{prompts[1]}, outputs "
                   f"{outputs[0]}..{outputs[1]} tokens")  # fmt: skip
        sections.append(f"{heading}\n\n{table}")
        print(sections[-1] + "\n", flush=True)
    header = (f"## Serving on the CPU: KV layouts, chunked prefill, the policies ({ARGS.model} shape)\n\n"
              f"Command: `{harness.command_line()}`. Machine: {harness.machine()}. Date: {harness.today()}.\n\n"
              f"Each figure is the mean of two rounds (the second in reverse order). Batch-1 decode step measured "
              f"first: invariant kernels {1e3 * step_s['numpy']:.1f} ms, BLAS {1e3 * step_s['numpy-blas']:.1f} ms, "
              f"so serial and instances ran on `{solo}`.\n\n")  # fmt: skip
    if not ARGS.no_write:
        harness.write_section("serving_cpu", header + "\n\n".join(sections))


if __name__ == "__main__":
    main()
