"""Tensor-parallel scaling on CPU ranks: decode step time and throughput for 1 and 2 ranks.

    python benchmarks/tp_scaling.py                  # gpt2-medium, written to RESULTS.md
    python benchmarks/tp_scaling.py --quick          # tiny preset: checks the script runs

Each variant is one ``mpiexec -n N python -m mpi4py`` job of this script in
``--job`` mode, one BLAS and one Numba thread per rank. Variants run in
rounds, 1 rank then 2 ranks then ..., so that a noisy neighbour slows them
alike. The machine is shared, so each job waits until the cores are idle
(``--quiet-below``), the figures are each variant's fastest step over all
rounds (the median of its best round beside it), and the table shows how busy
the cores were just before that job and the 1-minute load average just after
it (2 cores: a load above 2 means other work shared them). A step decodes B requests
at position ``--position`` (its cost does not depend on what the KV slots
hold); throughput is B / step time.

Two views of the communication: "time in MPI" is the share of the step rank
r spends inside MPI calls (broadcasts, the reductions, the gather of logits),
waits for a slower rank included; "MPI calls alone" is the time of the same
calls issued back to back with no math between them, so no rank waits for
another: the price of the traffic itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

harness.start()  # each rank's threads come from its environment (run_variant)

import numpy as np  # noqa: E402

VARIANTS = {  # key: (what the table calls it, ranks, threads per rank, launch options)
    "1": ("1 rank", 1, 1, {}),
    "2": ("2 ranks (vocab-parallel, rank-order sum)", 2, 1, {}),
    "2-replicated": ("2 ranks, replicated embedding and LM head", 2, 1, {"vocab_parallel": False}),
    "2-allreduce": ("2 ranks, MPI Allreduce", 2, 1, {"deterministic": False}),
    "1x2": ("1 rank, 2 threads (not TP: for scale)", 1, 2, {}),
}


def step_traffic(config, batch: int, options: dict, repeats: int = 20) -> float:
    """Seconds of one decode step's MPI calls when no rank waits for another: the same broadcasts,
    reductions and gather as a step, back to back, with no math between them."""
    from mpi4py import MPI

    from mpi_tp import TPComm, vocab_bounds

    tp = TPComm(MPI.COMM_WORLD, options.get("deterministic", True))
    vocab_parallel = options.get("vocab_parallel", True)
    bounds = vocab_bounds(config.vocab_size, tp.world) if vocab_parallel else np.array([0] + [config.vocab_size] * tp.world)
    x = np.zeros((batch, config.n_embd), np.float32)  # [B, C]
    logits = np.zeros((batch, bounds[tp.rank + 1] - bounds[tp.rank]), np.float32)  # [B, V_r]
    tp.comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        tp.bcast(np.zeros(3, np.int64))  # the command header
        tp.bcast(np.zeros((3, batch), np.int64))  # slots, tokens, positions
        for _ in range(2 * config.n_layer + vocab_parallel):  # after attn_proj and mlp_proj; the embedding
            tp.reduce_sum(x)
        tp.gather_columns(logits, bounds)
    return (time.perf_counter() - start) / repeats


def job(model: str, batches: list[int], position: int, steps: int, options: dict) -> None:
    """One variant, on every rank of an mpiexec job; rank 0 prints one JSON line."""
    from mpi_tp import launch
    from reference import init_weights, preset

    config = preset(model)
    traffic = {batch: step_traffic(config, batch, options) for batch in batches}
    weights = init_weights(config)
    backend = launch(config, weights, n_slots=max(batches), **options)
    del weights  # every rank keeps only its shard
    if backend is None:
        return
    out = []
    for batch in batches:
        step = harness.decode_step(backend, batch, position)
        step()  # warm up
        comm = backend.comm_seconds()
        times = harness.times_s(step, steps, warmup=0)
        share = (backend.comm_seconds() - comm) / sum(times)  # [N] fraction of the steps' time
        best, median = min(times), float(np.median(times))
        out.append(dict(batch=batch, step_s=best, median_s=median, tokens_per_s=batch / best, comm_share=share.tolist(),
                        traffic_s=traffic[batch]))  # fmt: skip
    backend.close()
    print(json.dumps(out), flush=True)


def busy_fraction(seconds: float = 1.0) -> float:
    """The share of all cores' time spent busy over the next ``seconds`` (from /proc/stat)."""

    def sample() -> np.ndarray:
        with open("/proc/stat") as stat:
            fields = np.array(stat.readline().split()[1:], np.int64)  # user nice system idle iowait ...
        return np.array([fields.sum(), fields[3] + fields[4]])  # [total, idle]

    first = sample()
    time.sleep(seconds)
    total, idle = sample() - first
    return float(1 - idle / max(total, 1))


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Wait until the cores are busy less than ``threshold`` of the time (others' work); -> the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


def run_variant(name: str, args: argparse.Namespace) -> list[dict]:
    _, ranks, threads, options = VARIANTS[name]
    busy = wait_for_quiet(args.quiet_below, args.max_wait_s) if os.path.exists("/proc/stat") else float("nan")
    env = dict(os.environ, **harness.thread_env(threads), PYTHONPATH=str(harness.ROOT))
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py",
               __file__, "--job", json.dumps(options), "--model", args.model, "--batches", args.batches,
               "--position", str(args.position), "--steps", str(args.steps)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [dict(r, busy_before=busy, load_after=os.getloadavg()[0]) for r in rows]


def table(best: dict[str, list[dict]], batches: list[int]) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in best["1"]}
    lines = ["| variant | batch | step (ms), best / median | tokens/s | vs 1 rank | time in MPI per rank "
             "| MPI calls alone (ms) | busy before / load after |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in best.items():
        for r in rows:
            cells = [
                VARIANTS[name][0], str(r["batch"]), f"{1e3 * r['step_s']:.1f} / {1e3 * r['median_s']:.1f}",
                f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base[r['batch']]:.2f}x",
                " / ".join(f"{100 * s:.1f}%" for s in r["comm_share"]), f"{1e3 * r['traffic_s']:.2f}",
                f"{100 * r['busy_before']:.0f}% / {r['load_after']:.1f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = harness.parser(__doc__, quick="tiny preset, 1 round, no wait for idle cores: checks the script runs")
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--position", type=int, default=128, help="the context position every request decodes at")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quiet-below", type=float, default=0.15, help="start a job once the cores are this idle")
    p.add_argument("--max-wait-s", type=float, default=300, help="longest wait for quiet before a job")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated keys of VARIANTS (1 first)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.job is not None:
        return job(args.model, batches, args.position, args.steps, json.loads(args.job))
    if args.quick:
        args.model, args.rounds, args.steps, args.position, args.max_wait_s, args.no_write = "tiny", 1, 3, 16, 0, True
    names = args.variants.split(",")
    best: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name in names:
            rows = run_variant(name, args)
            print(f"round {round_ + 1} {VARIANTS[name][0]} (busy {100 * rows[0]['busy_before']:.0f}%,"
                  f" load {rows[0]['load_after']:.1f}): " + ", ".join(
                f"B={r['batch']} {1e3 * r['step_s']:.1f} ms" for r in rows), flush=True)  # fmt: skip
            best[name] = [min(a, b, key=lambda r: r["step_s"]) for a, b in zip(best.get(name, rows), rows, strict=True)]
    figures = table(best, batches)
    if "2" in best:
        ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(best["1"], best["2"], strict=True)]
        figures += "\n\nThe mark, 2 ranks >= 1.7x the throughput of 1 rank with one thread each: " + ", ".join(
            f"batch {b}: {r:.2f}x ({'met' if r >= 1.7 else 'not met'})" for b, r in zip(batches, ratios, strict=True)
        )
    print(figures)
    body = (
        f"## Tensor parallelism on CPU ranks (`{args.model}`)\n\n"
        f"Command: `{harness.command_line()}`  \nMachine: {harness.machine()}  \nDate: {harness.today()}  \n"
        f"Decode step at position {args.position}, one BLAS and one Numba thread per rank unless named; "
        f"fastest of {args.rounds} rounds x {args.steps} steps.\n\n{figures}\n"
    )
    if not args.no_write:
        harness.write_section("tp_scaling", body)


if __name__ == "__main__":
    main()
