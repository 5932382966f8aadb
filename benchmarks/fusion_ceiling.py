"""How much temporal fusion can gain on this machine, measured from its own step times.

    python benchmarks/fusion_ceiling.py              # gpt2 shape, written to RESULTS.md
    python benchmarks/fusion_ceiling.py --quick      # tiny preset: checks the script runs

Fusion turns many batch-1 decode steps into one step of batch B. It pays off
by as much as a batch-B step costs less than B batch-1 steps: on a GPU, whose
decode step is bound by reading the weights, a step of 32 costs little more
than a step of 1; on a CPU the step is soon bound by arithmetic and grows
with B. Both policies also prefill every prompt, at the same cost. So no
policy can serve more than

    ceiling(B) = (step(1) + prefill / n_out) / (step(B) / B + prefill / n_out)

times serial's tokens per second, with ``prefill`` the time of one prompt of
the mean length and ``n_out`` the mean number of generated tokens. This
script measures step(B) for each B and the prefill time, on the backend the
serving benchmark uses, and prints the ceiling.
"""

from __future__ import annotations

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

harness.start()

import numpy as np  # noqa: E402

from flover.backends import make_backend  # noqa: E402
from reference import init_weights, preset  # noqa: E402


def main() -> None:
    p = harness.parser(__doc__, quick="tiny preset: checks the script runs")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--batches", default="1,8,16,32,64")
    p.add_argument("--position", type=int, default=100, help="cached positions per request (prompt + half the output)")
    p.add_argument("--prompt-len", type=int, default=40, help="mean prompt length (serving_cpu: uniform 16..64)")
    p.add_argument("--output-len", type=int, default=80, help="mean generated tokens (serving_cpu: uniform 32..128)")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if args.quick:
        args.model, args.batches, args.position, args.prompt_len, args.output_len = "tiny", "1,4", 8, 4, 8
        args.repeats, args.no_write = 3, True

    config = preset(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    backend = make_backend(args.backend, config, init_weights(config, seed=0), max(batches))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt_len)
    prefill_s = harness.median_s(lambda: backend.prefill(0, prompt), args.repeats)  # the untimed first call compiles
    blas = make_backend("numpy-blas", config, backend.weights, 1) if args.backend == "numpy" else None
    blas_prefill_s = harness.median_s(lambda: blas.prefill(0, prompt), args.repeats) if blas else None
    step_s = {b: harness.median_s(harness.decode_step(backend, b, args.position), args.repeats) for b in batches}

    per_prompt = prefill_s / args.output_len  # prefill time per generated token
    serial = step_s[1] + per_prompt
    lines = ["| batch B | step (ms) | per token (ms) | tokens/s, decode only | ceiling vs batch 1, decode only "
             "| ceiling vs batch 1, with prefill |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for b, s in step_s.items():
        lines.append(f"| {b} | {1e3 * s:.1f} | {1e3 * s / b:.2f} | {b / s:.0f} | {step_s[1] / (s / b):.1f}x "
                     f"| {serial / (s / b + per_prompt):.1f}x |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    versus = f" (with BLAS instead: {1e3 * blas_prefill_s:.1f} ms)" if blas else ""
    print(f"prefill of {args.prompt_len} tokens: {1e3 * prefill_s:.1f} ms{versus}")
    if args.no_write:
        return
    body = f"""## What fusion can gain on this machine (`{args.model}` shape, `{args.backend}` backend)

`{harness.command_line()}` on {harness.machine()}, {harness.today()}. A decode step of B requests with
{args.position} cached positions each (median of {args.repeats}); a prefill of {args.prompt_len} tokens takes
{1e3 * prefill_s:.1f} ms{versus}, spread here over {args.output_len} generated tokens, the means of the serving trace.
The last column bounds fused over serial throughput in `serving_cpu` at that batch size (module docstring).

{table}
"""
    harness.write_section("fusion_ceiling", body)


if __name__ == "__main__":
    main()
