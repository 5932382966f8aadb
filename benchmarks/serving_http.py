"""Serving over HTTP, gpt2 shape: what the HTTP front end costs per token and on the first token, and fused
against dynamic batching behind the same server.

    python benchmarks/serving_http.py            # the full run, written to RESULTS.md
    python benchmarks/serving_http.py --quick    # tiny preset, 12 requests: checks the script runs

One Poisson trace (greedy, variable output lengths) is served three ways:

1. in process: the engine replays the trace itself (what ``flover bench`` does);
2. over HTTP, fused: ``flover serve --policy fused`` runs as its own process on
   a loopback port, and this process replays the same trace with streaming
   clients (what ``flover bench --url`` does), timing each token as it arrives;
3. over HTTP, dynamic: the same against ``flover serve --policy dynamic``.

Both servers start first and stay up; the runs take turns in two rounds, the
second in reverse order, and each figure is the mean of both. The clients
share the machine's cores with the server, as a load generator on the same
host does. The HTTP cost is the difference between 2 and 1 on the same trace:
time to first token (the request's parse, the queue hop to the engine's
thread, the first event) and time per output token (one server-sent event per
token, and the engine's thread sharing the interpreter with the event loop).
"""

from __future__ import annotations

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

ARGS_PARSER = harness.parser(__doc__, quick="tiny preset, 12 requests: checks the script runs")
ARGS_PARSER.add_argument("--model", default="gpt2")
ARGS_PARSER.add_argument("--requests", type=int, default=64)
ARGS_PARSER.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
ARGS_PARSER.add_argument("--prompt-len", default="16:64")
ARGS_PARSER.add_argument("--output-len", default="32:128")
ARGS_PARSER.add_argument("--slots", type=int, default=32, help="fused slots, dynamic's largest batch")
ARGS_PARSER.add_argument("--queue-delay-ms", type=float, default=50.0, help="dynamic: how long a batch waits for more requests")
ARGS_PARSER.add_argument("--threads", type=int, default=2, help="the engine's threads, in process and in the servers")
ARGS_PARSER.add_argument("--rounds", type=int, default=2)
ARGS_PARSER.add_argument("--seed", type=int, default=0)
ARGS = ARGS_PARSER.parse_args()
if ARGS.quick:
    ARGS.model, ARGS.requests, ARGS.rate, ARGS.prompt_len, ARGS.output_len = "tiny", 12, 200.0, "4:8", "4:24"
    ARGS.slots, ARGS.rounds, ARGS.no_write = 8, 1, True
harness.start(threads=ARGS.threads)

import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from flover.backends import BackendFactory  # noqa: E402
from flover.http_run import http_run  # noqa: E402
from flover.loading import resolve  # noqa: E402
from flover.runner import PolicyConfig, RunResult, check_trace, run_policy, warm_up  # noqa: E402
from flover.trace import parse_range, poisson_trace  # noqa: E402

STARTUP_S = 600  # a gpt2 server builds its random weights and compiles before it serves


class Server:
    """``flover serve`` in its own process, on a free loopback port."""

    def __init__(self, policy: str) -> None:
        command = [sys.executable, "-m", "flover.cli", "serve", "--model", ARGS.model, "--policy", policy, "--port", "0",
                   "--slots", str(ARGS.slots), "--max-batch", str(ARGS.slots), "--queue-delay-ms",
                   str(ARGS.queue_delay_ms), "--max-waiting", str(4 * ARGS.requests)]  # fmt: skip
        env = {**os.environ, **harness.thread_env(ARGS.threads)}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        first = self.proc.stdout.readline()  # printed once it serves
        found = re.search(r"at (http://\S+);", first)
        if found is None:
            self.proc.kill()
            raise SystemExit(f"flover serve --policy {policy} did not start: {first!r}")
        self.url = found.group(1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def mean(runs: list[RunResult], *keys: str) -> float:
    values = []
    for run in runs:
        value = run.metrics
        for key in keys:
            value = value[key]
        values.append(value)
    return sum(values) / len(values)


def table(groups: dict[str, list[RunResult]]) -> str:
    lines = ["| run | tok/s | TTFT mean (ms) | TTFT p99 (ms) | TPOT mean (ms) | ITL mean (ms) | ITL p99 (ms) "
             "| latency mean (s) | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, runs in groups.items():
        itl = (f"{mean(runs, 'itl_s', 'mean') * 1e3:.1f} | {mean(runs, 'itl_s', 'p99') * 1e3:.1f}"
               if runs[0].metrics.get("itl_s") else "- | -")  # fmt: skip
        lines.append(f"| {label} | {mean(runs, 'throughput_tok_s'):.1f} | {mean(runs, 'ttft_s', 'mean') * 1e3:.1f} "
                     f"| {mean(runs, 'ttft_s', 'p99') * 1e3:.1f} | {mean(runs, 'tpot_s', 'mean') * 1e3:.1f} | {itl} "
                     f"| {mean(runs, 'latency_s', 'mean'):.2f} | {mean(runs, 'mean_batch'):.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    config, weights, _ = resolve(ARGS.model)
    trace = poisson_trace(ARGS.rate, ARGS.requests, parse_range(ARGS.prompt_len, "--prompt-len"),
                          parse_range(ARGS.output_len, "--output-len"), seed=ARGS.seed,
                          vocab_size=config.vocab_size)  # fmt: skip
    check_trace(config, trace)
    fused = PolicyConfig("fused", slots=ARGS.slots)
    factory = BackendFactory("numpy", config, weights)
    backend = factory(fused.layout(config).shape)
    warm_up(backend)
    servers = {"fused": Server("fused"), "dynamic": Server("dynamic")}
    for server in servers.values():  # untimed: the server's first requests and connections
        http_run(server.url, trace[:4], None, {})
    labels = {"in": f"fused (slots {ARGS.slots}), in process", "fused": f"fused (slots {ARGS.slots}) over HTTP",
              "dynamic": f"dynamic over HTTP (batch {ARGS.slots}, delay {ARGS.queue_delay_ms:g} ms)"}  # fmt: skip
    variants = {
        "in": lambda: run_policy(fused, factory, trace, backend=backend),
        "fused": lambda: http_run(servers["fused"].url, trace, None, {})[0],
        "dynamic": lambda: http_run(servers["dynamic"].url, trace, None, {})[0],
    }
    runs: dict[str, list[RunResult]] = {key: [] for key in variants}
    try:
        for round_ in range(ARGS.rounds):
            for key in variants if round_ % 2 == 0 else reversed(variants):
                run = variants[key]()
                if len(run.results) != len(trace):
                    raise SystemExit(f"{labels[key]}: {len(trace) - len(run.results)} requests failed")
                runs[key].append(run)
                print(f"round {round_ + 1}: {labels[key]}: {run.metrics['throughput_tok_s']:.1f} tok/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    tokens = {key: [sorted((str(r.id), list(r.tokens)) for r in run.results) for run in group] for key, group in runs.items()}
    same = all(t == tokens["in"][0] for group in tokens.values() for t in group)
    text = table({labels[k]: v for k, v in runs.items()})
    ttft = (mean(runs["fused"], "ttft_s", "mean") - mean(runs["in"], "ttft_s", "mean")) * 1e3
    tpot = (mean(runs["fused"], "tpot_s", "mean") - mean(runs["in"], "tpot_s", "mean")) * 1e3
    throughput = mean(runs["fused"], "throughput_tok_s") / mean(runs["dynamic"], "throughput_tok_s")
    latency = mean(runs["dynamic"], "latency_s", "mean") / mean(runs["fused"], "latency_s", "mean")
    notes = [f"- HTTP cost, fused: time to first token {ttft:+.1f} ms (mean), time per output token {tpot:+.2f} ms "
             f"(mean), against the in-process run of the same trace",
             f"- over HTTP, fused throughput / dynamic's: {throughput:.2f}x; dynamic's mean latency / fused's: {latency:.2f}x",
             f"- token-identical, every run against the in-process one: {'yes' if same else 'NO'}"]  # fmt: skip
    print(text + "\n\n" + "\n".join(notes))
    if not same:
        raise SystemExit("the HTTP runs' tokens differ from the in-process run's")
    if not ARGS.no_write:
        header = (f"## Serving over HTTP ({ARGS.model} shape, {ARGS.requests} Poisson requests at {ARGS.rate:g}/s)\n\n"
                  f"Command: `{harness.command_line()}` (prompts {ARGS.prompt_len}, outputs {ARGS.output_len} tokens, "
                  f"greedy; servers and clients on one machine over loopback, {ARGS.threads} engine threads; mean of "
                  f"{ARGS.rounds} rounds). Machine: {harness.machine()}. Date: {harness.today()}.\n\n")  # fmt: skip
        harness.write_section("serving_http", header + text + "\n\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
