"""The serving policies end to end on the numba backend: fused (Flover) against serial, dynamic and instances.

    python benchmarks/gpu_policies.py                # gpt2 shape, random weights -> RESULTS.md
    python benchmarks/gpu_policies.py --quick        # 16 requests; prints, writes nothing

One Poisson trace, every policy on the wall clock through ``flover.runner``
(the engine's one loop; instances as processes, each with its own backend,
warmed before the clock starts). The fused and serial runs share one warmed
backend. Tokens are greedy; fused and serial must give every request the same
tokens (batch invariance), and the table says whether they did. Without a
GPU it says so and exits 2.
"""

from __future__ import annotations

import sys

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

ARGS_PARSER = harness.parser(__doc__, quick="16 requests; prints, writes nothing")
ARGS_PARSER.add_argument("--model", default="gpt2")
ARGS_PARSER.add_argument("--rate", type=float, default=16.0, help="arrivals per second")
ARGS_PARSER.add_argument("--requests", type=int, default=64)
ARGS_PARSER.add_argument("--prompt-len", default="16:64", help="min:max tokens")
ARGS_PARSER.add_argument("--output-len", default="32:128", help="min:max tokens")
harness.start()

from numba_kernels.device import cuda_available, device_name, simulated  # noqa: E402
from reference import init_weights, preset  # noqa: E402


def main() -> int:
    args = ARGS_PARSER.parse_args()
    if simulated() or not cuda_available():
        print("no CUDA GPU (or NUMBA_ENABLE_CUDASIM is set): benchmarks/gpu_policies.py measures a GPU; nothing written")
        return 2
    from flover.backends import BackendFactory
    from flover.runner import PolicyConfig, check_trace, run_policy, warm_up
    from flover.trace import poisson_trace

    n = 16 if args.quick else args.requests
    prompt_len, output_len = (tuple(int(v) for v in text.split(":")) for text in (args.prompt_len, args.output_len))
    config = preset(args.model)
    make = BackendFactory("numba", config, init_weights(config, seed=0))
    trace = poisson_trace(args.rate, n, prompt_len, output_len, seed=0, vocab_size=config.vocab_size)
    check_trace(config, trace)
    plans = [PolicyConfig("fused", slots=32), PolicyConfig("fused", slots=32, shuffle=False), PolicyConfig("serial"),
             PolicyConfig("dynamic", max_batch=32, queue_delay_s=0.05), PolicyConfig("instances", instances=2)]  # fmt: skip
    shared = make(32)
    warm_up(shared)
    runs = [run_policy(pc, make, trace, backend=None if pc.policy == "instances" else shared) for pc in plans]
    tokens = [{r.id: list(r.tokens) for r in run.results} for run in runs]
    same = all(t == tokens[0] for t in tokens[1:])
    lines = [f"## Serving policies on {device_name()}, numba backend\n",
             f"Command: `{harness.command_line()}`. Date: {harness.today()}. {args.model} shape, random weights, {n} "
             f"Poisson requests at {args.rate:g}/s, prompts {prompt_len[0]}-{prompt_len[1]} tokens, outputs "
             f"{output_len[0]}-{output_len[1]}, greedy; wall clock.\n",
             "| policy | tok/s | mean latency (s) | p99 latency (s) | mean TTFT (s) |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        m = run.metrics
        lines.append(f"| {run.config.label} | {m['throughput_tok_s']:.1f} | {m['latency_s']['mean']:.3f} | "
                     f"{m['latency_s']['p99']:.3f} | {m['ttft_s']['mean']:.3f} |")  # fmt: skip
    fused, serial = runs[0].metrics, runs[2].metrics
    lines += ["", f"- fused throughput / serial: **{fused['throughput_tok_s'] / serial['throughput_tok_s']:.2f}x**; "
              f"serial mean latency / fused: **{serial['latency_s']['mean'] / fused['latency_s']['mean']:.2f}x**",
              f"- every policy gave every request the same tokens: {'yes' if same else 'NO'}"]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    if not (args.quick or args.no_write):
        harness.write_section("gpu_policies", body)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
