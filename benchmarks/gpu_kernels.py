"""The Numba CUDA kernels against this GPU's own ceilings, on GPT-2 shapes (124M and 1.5B).

    python benchmarks/gpu_kernels.py                # every kernel, batch 1..64; the table into RESULTS.md
    python benchmarks/gpu_kernels.py --quick        # gpt2 shapes, batch 1 and 16; prints only
    python benchmarks/gpu_kernels.py --policies     # then the four serving policies end to end (needs flover)

The two ceilings are measured first, in the same run: copy bandwidth (a 1 GiB
device-to-device copy, bytes read + written) and fp32 matmul through torch
with TF32 off. Then each kernel: GPU time (launches queued behind a holding
kernel, see numba_kernels/timing.py), the rate it reached, and its fraction of
the ceiling that bounds it. Marks: decode GEMM >= 70% of copy bandwidth, tiled
GEMM >= 40% of torch fp32, decode attention >= 50% and the shuffle >= 80% of
copy bandwidth. Without a GPU it says so and exits 2: it writes no number it
did not measure.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

harness.start()

import numpy as np  # noqa: E402

from numba_kernels.device import cuda_available, device_name, simulated  # noqa: E402
from reference import init_weights, preset  # noqa: E402

MODELS = {"gpt2": "124M", "gpt2-xl": "1.5B"}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 1024  # decode attention reads this many positions per request; the shuffle moves half of it
MARKS = {"decode GEMM": 0.70, "tiled GEMM": 0.40, "decode attention": 0.50, "shuffle": 0.80}


@dataclass(frozen=True, slots=True)
class Row:
    kernel: str
    model: str
    batch: int
    shape: str
    us: float  # GPU time
    rate: float  # GB/s or GFLOP/s
    unit: str
    ceiling: float  # same unit
    host_us: float | None = None  # as Python sees it, launch overhead included

    @property
    def fraction(self) -> float:
        return self.rate / self.ceiling if self.ceiling else float("nan")

    def line(self) -> str:
        mark = next((v for k, v in MARKS.items() if self.kernel.startswith(k)), None)
        known = self.fraction == self.fraction  # not NaN: the ceiling was measured
        verdict = "" if mark is None or not known else ("met" if self.fraction >= mark else "below") + f" ({mark:.0%})"
        host = "" if self.host_us is None else f"{self.host_us:,.0f}"
        fraction = f"{self.fraction:.0%}" if known else "n/a"
        return (f"| {self.kernel} | {self.model} | {self.batch} | {self.shape} | {self.us:,.1f} | {host} | "
                f"{self.rate:,.0f} {self.unit} | {fraction} | {verdict} |")  # fmt: skip


def random_device(shape, seed=0):
    from numba import cuda

    return cuda.to_device(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


# ------------------------------------------------------------------ ceilings


def copy_ceiling_gbs(n_bytes: int = 1 << 30) -> float:
    from numba import cuda

    from numba_kernels.timing import gpu_time_ms

    src, dst = cuda.device_array(n_bytes // 4, np.float32), cuda.device_array(n_bytes // 4, np.float32)
    ms = gpu_time_ms(dst.copy_to_device, src, reps=10)
    return 2 * n_bytes / ms / 1e6  # read + write


def torch_matmul_gflops(m: int, n: int, k: int) -> float | None:
    """fp32 matmul through torch with TF32 off; None when torch has no CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a, b = torch.randn(m, k, device="cuda"), torch.randn(k, n, device="cuda")
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * m * n * k / (start.elapsed_time(end) / reps) / 1e6


# ------------------------------------------------------------------ kernels


def layer_linears(model: str) -> list[tuple[int, int]]:
    """(N, K) of a block's four linear layers; w is [K, N]."""
    c = preset(model)
    return [(3 * c.n_embd, c.n_embd), (c.n_embd, c.n_embd), (c.d_mlp, c.n_embd), (c.n_embd, c.d_mlp)]


def gemm_rows(model: str, batches, copy_gbs: float) -> list[Row]:
    from numba import cuda

    from numba_kernels.dispatch import Dispatch
    from numba_kernels.timing import gpu_time_ms

    dispatch, c, rows = Dispatch(), preset(model), []
    for label, shapes in (("decode GEMM (c_attn, attn_proj, c_fc, mlp_proj)", layer_linears(model)),
                          ("decode GEMM (LM head)", [(c.vocab_size, c.n_embd)])):  # fmt: skip
        args = [(random_device((k, n)), random_device(n)) for n, k in shapes]
        for batch in batches:
            xs = [random_device((batch, k)) for _, k in shapes]
            outs = [cuda.device_array((batch, n), np.float32) for n, _ in shapes]
            ms = sum(gpu_time_ms(dispatch.gemm, x, *wb, out) for x, wb, out in zip(xs, args, outs))
            n_bytes = 4 * sum(k * n + batch * (k + n) + n for n, k in shapes)
            kinds = sorted({str(dispatch.choose(batch, n, k)) for n, k in shapes})
            rows.append(Row(label, model, batch, ", ".join(kinds), 1e3 * ms, n_bytes / ms / 1e6, "GB/s", copy_gbs))
    return rows


def tiled_rows(model: str, m: int) -> list[Row]:
    from numba import cuda

    from numba_kernels.dispatch import Dispatch
    from numba_kernels.timing import gpu_time_ms

    dispatch, rows = Dispatch(), []
    for n, k in layer_linears(model):
        x, w, b = random_device((m, k)), random_device((k, n)), random_device(n)
        out = cuda.device_array((m, n), np.float32)
        ms = gpu_time_ms(dispatch.gemm, x, w, b, out)
        torch_gflops = torch_matmul_gflops(m, n, k) or float("nan")
        rows.append(Row("tiled GEMM", model, m, f"{m}x{n}x{k} {dispatch.choose(m, n, k)} vs torch",
                        1e3 * ms, 2 * m * n * k / ms / 1e6, "GFLOP/s", torch_gflops))  # fmt: skip
    return rows


def attention_rows(model: str, batches, copy_gbs: float) -> list[Row]:
    from numba import cuda

    from numba_kernels.attention import attention
    from numba_kernels.timing import gpu_time_ms

    c, rows = preset(model), []
    for batch in batches:
        k = random_device((batch, c.n_head, c.n_ctx, c.head_dim))
        v = random_device((batch, c.n_head, c.n_ctx, c.head_dim), seed=1)
        qkv, out = random_device((batch, 3 * c.n_embd)), cuda.device_array((batch, c.n_embd), np.float32)
        slots = cuda.to_device(np.arange(batch, dtype=np.int32))
        lengths = cuda.to_device(np.full(batch, CONTEXT, np.int32))
        ms = gpu_time_ms(attention, qkv, k, v, slots, lengths, out)
        n_bytes = 4 * batch * (2 * c.n_head * CONTEXT * c.head_dim + 4 * c.n_embd)
        rows.append(Row("decode attention", model, batch, f"one layer, {CONTEXT} positions each", 1e3 * ms,
                        n_bytes / ms / 1e6, "GB/s", copy_gbs))  # fmt: skip
    return rows


def shuffle_rows(model: str, pair_counts, copy_gbs: float) -> list[Row]:
    from numba import cuda

    from numba_kernels.shuffle import launch_move, upload_plan
    from numba_kernels.timing import gpu_time_ms

    c, rows, length = preset(model), [], CONTEXT // 2
    for pairs in pair_counts:
        shape = (c.n_layer, 2 * pairs, c.n_head, c.n_ctx, c.head_dim)
        k, v = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
        state = cuda.to_device(np.zeros(2 * pairs, np.int32))
        plan = upload_plan(np.arange(pairs, 2 * pairs), np.arange(pairs), np.full(pairs, length), 2 * pairs, c.n_ctx)
        ms = gpu_time_ms(launch_move, k, v, state, plan, length)
        n_bytes = 2 * 2 * 4 * pairs * c.n_layer * c.n_head * length * c.head_dim  # K and V, read + write
        rows.append(Row("shuffle", model, pairs, f"{pairs} slot moves of {length} positions, all layers",
                        1e3 * ms, n_bytes / ms / 1e6, "GB/s", copy_gbs))  # fmt: skip
    return rows


def elementwise_rows(model: str, batch: int, copy_gbs: float) -> list[Row]:
    from numba_kernels import elementwise as ew
    from numba_kernels.timing import gpu_time_ms

    c = preset(model)
    x, g, b, out = (random_device(s) for s in ((batch, c.n_embd), (c.n_embd,), (c.n_embd,), (batch, c.n_embd)))
    f = random_device((batch, c.d_mlp))
    ln = gpu_time_ms(ew.layer_norm, x, g, b, 1e-5, out)
    gelu = gpu_time_ms(ew.gelu, f, f)
    return [Row("layer norm", model, batch, f"{batch}x{c.n_embd}", 1e3 * ln, 8 * batch * c.n_embd / ln / 1e6, "GB/s",
                copy_gbs),
            Row("GELU", model, batch, f"{batch}x{c.d_mlp}", 1e3 * gelu, 8 * batch * c.d_mlp / gelu / 1e6, "GB/s",
                copy_gbs)]  # fmt: skip


def step_rows(model: str, batches, copy_gbs: float) -> list[Row]:
    """A whole decode step of NumbaBackend as Python sees it (it ends copying logits to the host, so
    the time includes every launch's overhead); the rate counts the weights it reads, each once."""
    from numba_kernels import NumbaBackend
    from numba_kernels.timing import host_time_ms

    config, rows = preset(model), []
    backend = NumbaBackend(config, init_weights(config, seed=0), n_slots=max(batches))
    weights = backend.weights
    n_bytes = 4 * (weights.wte.size + sum(lin.w.size for blk in weights.blocks
                                          for lin in (blk.c_attn, blk.attn_proj, blk.c_fc, blk.mlp_proj)))  # fmt: skip
    for batch in batches:  # the cache holds whatever memory held: the time does not depend on values
        ms = host_time_ms(harness.decode_step(backend, batch, CONTEXT // 2))
        rows.append(Row("decode step (backend, host-timed)", model, batch,
                        f"{config.n_layer} layers, {CONTEXT // 2} positions", 1e3 * ms, n_bytes / ms / 1e6, "GB/s",
                        copy_gbs, host_us=1e3 * ms))  # fmt: skip
    return rows


# ------------------------------------------------------------------ end to end (needs flover)


def policies_section(model: str, rate: float, n_requests: int, prompt_len=(16, 64), output_len=(32, 128)) -> str:
    """The four serving policies on one Poisson trace, on this backend.

    Assumes flover's API: ``flover.backends.make_backend(name, config, weights, n_slots)``,
    ``flover.runner.PolicyConfig / run_policy / warm_up / check_trace``, ``flover.trace.poisson_trace``,
    and ``RunResult.metrics`` with ``throughput_tok_s``, ``latency_s`` and ``ttft_s``.
    """
    from flover.backends import make_backend
    from flover.runner import PolicyConfig, check_trace, run_policy, warm_up
    from flover.trace import poisson_trace

    config = preset(model)
    weights = init_weights(config, seed=0)
    make = lambda n: make_backend("numba", config, weights, n)  # noqa: E731
    trace = poisson_trace(rate, n_requests, prompt_len, output_len, seed=0, vocab_size=config.vocab_size)
    check_trace(config, trace)
    shared = make(32)
    warm_up(shared, config)
    plans = [PolicyConfig("fused", slots=32), PolicyConfig("fused", slots=32, shuffle=False), PolicyConfig("serial"),
             PolicyConfig("dynamic", max_batch=32, window_s=0.05), PolicyConfig("instances", instances=2)]  # fmt: skip
    runs = [run_policy(pc, make, trace, backend=None if pc.policy == "instances" else shared) for pc in plans]
    lines = [f"End to end, {model} shape, {n_requests} Poisson requests at {rate:g}/s (prompts {prompt_len[0]}-"
             f"{prompt_len[1]} tokens, outputs {output_len[0]}-{output_len[1]}), the numba backend:",
             "", "| policy | tok/s | mean latency (s) | p99 latency (s) | mean TTFT (s) |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        m = run.metrics
        lines.append(f"| {run.config.label} | {m['throughput_tok_s']:.1f} | {m['latency_s']['mean']:.2f} | "
                     f"{m['latency_s']['p99']:.2f} | {m['ttft_s']['mean']:.2f} |")  # fmt: skip
    fused, serial = runs[0].metrics, runs[2].metrics
    lines += ["", f"- fused throughput / serial: **{fused['throughput_tok_s'] / serial['throughput_tok_s']:.2f}x**; "
              f"serial mean latency / fused: **{serial['latency_s']['mean'] / fused['latency_s']['mean']:.2f}x**"]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main() -> int:
    p = harness.parser(__doc__, quick="gpt2 shapes, batch 1 and 16; prints, writes nothing")
    p.add_argument("--policies", action="store_true", help="also the serving policies end to end (needs flover)")
    p.add_argument("--rate", type=float, default=8.0, help="arrivals per second for --policies")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", default="16:64", help="for --policies: min:max tokens")
    p.add_argument("--output-len", default="32:128", help="for --policies: min:max tokens")
    args = p.parse_args()
    if simulated():
        print("NUMBA_ENABLE_CUDASIM is set: the simulator's timings mean nothing; run this on a GPU")
        return 2
    if not cuda_available():
        print("no CUDA GPU: benchmarks/gpu_kernels.py measures a GPU and writes nothing without one")
        return 2
    models, batches = (["gpt2"], (1, 16)) if args.quick else (list(MODELS), BATCHES)
    copy_gbs = copy_ceiling_gbs()
    peak = torch_matmul_gflops(4096, 4096, 4096)
    rows: list[Row] = []
    for model in models:
        rows += gemm_rows(model, batches, copy_gbs)
        rows += tiled_rows(model, 1024)
        rows += attention_rows(model, batches, copy_gbs)
        rows += shuffle_rows(model, (1, 4) if args.quick else (1, 4, 16), copy_gbs)
        rows += elementwise_rows(model, max(batches), copy_gbs)
    rows += step_rows("gpt2", batches, copy_gbs)
    header = (f"## Numba CUDA kernels on {device_name()}\n\nCommand: `{harness.command_line()}`. Date: {harness.today()}. "
              f"Ceilings measured in the same run: copy "
              f"{copy_gbs:,.0f} GB/s (1 GiB device-to-device, read + write); torch fp32 matmul, TF32 off: "
              + (f"{peak:,.0f} GFLOP/s at 4096^3" if peak else "n/a (torch without CUDA)")
              + ". GPU time with launches queued behind a holding kernel; host time is one call as Python sees it."
              "\n\n| kernel | model | batch | shape | GPU us | host us | achieved | of ceiling | mark |\n"
              "|---|---|---:|---|---:|---:|---:|---:|---|")  # fmt: skip
    body = header + "\n" + "\n".join(r.line() for r in rows)
    if args.policies:
        lengths = [tuple(int(v) for v in text.split(":")) for text in (args.prompt_len, args.output_len)]
        body += "\n\n" + policies_section("gpt2", args.rate, args.requests, *lengths)
    print(body)
    if not (args.quick or args.no_write):
        harness.write_section("gpu_kernels", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
