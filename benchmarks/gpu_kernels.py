"""The Numba CUDA kernels against this GPU's own ceilings on GPT-2 shapes, old versions beside new.

    python benchmarks/gpu_kernels.py                 # gpt2: linears, attention, shuffle, the step -> RESULTS.md
    python benchmarks/gpu_kernels.py --quick         # batch 1 and 16; prints, writes nothing
    python benchmarks/gpu_kernels.py --models gpt2,gpt2-xl

Ceilings measured in the same run (``gpu_measure.py``): copy bandwidth and
torch's fp32 matmul with TF32 off. Fair by construction:

- every timed repeat reads its weights (or K and V) from HBM: the inputs
  rotate through copies that fill 2.5 times the L2;
- each linear of a block is its own row, old (v3 GEMV) and new (v4 staged)
  side by side, torch on the same shape as the other ceiling: the roofline
  of a shape is its bytes at copy bandwidth or its FLOPs at torch's rate,
  whichever is longer, so a decode GEMM is held to bandwidth at small batch
  and to compute where that binds;
- attention counts the K and V bytes it reads; prefill attention (a
  1024-token prompt, each row its own causal length) is timed beside torch's
  fp32 scaled_dot_product_attention;
- the decode step: its GPU time (launches queued behind a holding kernel,
  ``numba_kernels/timing.py``) and its host time (as Python sees it, every
  launch's overhead) apart, against the sum of its kernels' roofline times.

Marks (the fraction of the ceiling's time): decode GEMM 70%, decode
attention 60%, shuffle 85%, tiled GEMM 50% of torch, the step's GPU time
within 1.5x of its roofline (67%). Without a GPU it says so and exits 2:
it writes no number it did not measure.
"""

from __future__ import annotations

import sys

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

ARGS_PARSER = harness.parser(__doc__, quick="batch 1 and 16, fewer rows; prints, writes nothing")
ARGS_PARSER.add_argument("--models", default="gpt2", help="presets, comma-separated")
harness.start()

import numpy as np  # noqa: E402

from numba_kernels.device import cuda_available, device_name, simulated  # noqa: E402
from reference import init_weights, preset  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 1024  # decode attention reads this many positions per request; the step decodes at half of it
MARKS = {"decode GEMM": 0.70, "decode attention": 0.60, "shuffle": 0.85, "tiled GEMM": 0.50, "decode step": 1 / 1.5}


def gemm_rows(model: str, batches, ceilings) -> list:
    from gpu_measure import Rotation, Row, random_device, torch_matmul_ms
    from numba import cuda

    from numba_kernels.catalog import linears
    from numba_kernels.dispatch import Dispatch
    from numba_kernels.gemm import Variant, launch

    dispatch, rows = Dispatch(), []
    for name, n, k in linears(preset(model)):
        rotation = Rotation(lambda i, k=k, n=n: (random_device((k, n), i), random_device(n, i)), 4 * k * n, ceilings.l2_bytes)
        for m in batches:
            x, out = random_device((m, k)), cuda.device_array((m, n), np.float32)
            n_bytes, flops = 4.0 * (k * n + m * k + m * n + n), 2.0 * m * n * k
            best = ceilings.roofline_us(n_bytes, flops)
            torch_us = 1e3 * torch_matmul_ms(m, n, k, ceilings.l2_bytes)
            rpow = 1 << max(0, m - 1).bit_length()
            old = Variant("gemv", (64, rpow)) if m <= 8 else Variant("tiled", (32, 32, 16, 4, 4))
            for version, variant in (("old " + str(old), old), ("dispatch " + str(dispatch.choose(m, n, k)), None)):
                variant = variant or dispatch.choose(m, n, k)
                us = 1e3 * rotation.time_ms(lambda w, b, v=variant, x=x, out=out: launch(v, x, w, b, out))
                rows.append(Row(f"decode GEMM {name}", version, m, f"{m}x{n}x{k}, torch {torch_us:,.1f} us", us, n_bytes,
                                flops, best, "roofline", MARKS["decode GEMM"]))  # fmt: skip
    return rows


def tiled_rows(model: str, m: int, ceilings) -> list:
    from gpu_measure import Rotation, Row, random_device, torch_matmul_ms
    from numba import cuda

    from numba_kernels.catalog import linears
    from numba_kernels.dispatch import Dispatch

    dispatch, rows = Dispatch(), []
    for name, n, k in linears(preset(model))[:4]:  # a prefill computes the head for its last row only
        rotation = Rotation(lambda i, k=k, n=n: (random_device((k, n), i), random_device(n, i)), 4 * k * n, ceilings.l2_bytes)
        x, out = random_device((m, k)), cuda.device_array((m, n), np.float32)
        us = 1e3 * rotation.time_ms(lambda w, b, x=x, out=out: dispatch.gemm(x, w, b, out))
        torch_us = 1e3 * torch_matmul_ms(m, n, k, ceilings.l2_bytes)
        rows.append(Row(f"tiled GEMM {name}", str(dispatch.choose(m, n, k)), m, f"{m}x{n}x{k}", us, 0.0, 2.0 * m * n * k,
                        torch_us, "torch", MARKS["tiled GEMM"]))  # fmt: skip
    return rows


def attention_rows(model: str, batches, ceilings) -> list:
    from gpu_measure import Rotation, Row, random_device
    from numba import cuda

    from numba_kernels import attention as v1
    from numba_kernels import attention_chunked as v2

    c, rows = preset(model), []
    for batch in batches:
        shape = (batch, c.n_head, c.n_ctx, c.head_dim)
        kv_bytes = 4 * batch * 2 * c.n_head * CONTEXT * c.head_dim
        rotation = Rotation(lambda i, s=shape: (random_device(s, 2 * i), random_device(s, 2 * i + 1)), kv_bytes,
                            ceilings.l2_bytes)  # fmt: skip
        qkv, out = random_device((batch, 3 * c.n_embd)), cuda.device_array((batch, c.n_embd), np.float32)
        slots = cuda.to_device(np.arange(batch, dtype=np.int32))
        lengths = cuda.to_device(np.full(batch, CONTEXT, np.int32))
        partials = cuda.device_array(v2.partials_shape(batch, c.n_head, c.n_ctx, c.head_dim), np.float32)
        n_bytes = kv_bytes + 4 * batch * 4 * c.n_embd
        inputs = (qkv, slots, lengths, out, partials)
        for version, run in (("v1 one block a head", lambda k, v, q, s, n, o, p: v1.attention(q, k, v, s, n, o)),
                             ("v2 chunks", lambda k, v, q, s, n, o, p: v2.attention(q, k, v, s, n, o, p, CONTEXT))):
            us = 1e3 * rotation.time_ms(run, *inputs)
            rows.append(Row("decode attention", version, batch, f"{CONTEXT} positions each, one layer", us, n_bytes, 0.0,
                            ceilings.roofline_us(n_bytes, 0.0), "roofline", MARKS["decode attention"]))  # fmt: skip
    return rows + prefill_attention_rows(model, min(1024, c.n_ctx))


def prefill_attention_rows(model: str, length: int) -> list:
    """One prompt's causal attention, one layer: each row a query over its own length, against torch's sdpa."""
    from gpu_measure import Row, random_device, torch_cuda, torch_ms
    from numba import cuda

    from numba_kernels import attention as v1
    from numba_kernels import attention_chunked as v2
    from numba_kernels.timing import gpu_time_ms

    c, torch = preset(model), torch_cuda()
    k, v = random_device((1, c.n_head, c.n_ctx, c.head_dim), 1), random_device((1, c.n_head, c.n_ctx, c.head_dim), 2)
    qkv, out = random_device((length, 3 * c.n_embd)), cuda.device_array((length, c.n_embd), np.float32)
    slots = cuda.to_device(np.zeros(length, np.int32))
    lengths = cuda.to_device(np.arange(1, length + 1, dtype=np.int32))
    partials = cuda.device_array(v2.partials_shape(length, c.n_head, c.n_ctx, c.head_dim), np.float32)
    flops = 4.0 * c.n_head * c.head_dim * length * (length + 1) / 2
    torch_us = float("nan")
    if torch is not None:
        q, kk, vv = (torch.randn(1, c.n_head, length, c.head_dim, device="cuda") for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        torch_us = 1e3 * torch_ms(lambda: sdpa(q, kk, vv, is_causal=True))
    return [Row("prefill attention", version, 1, f"{length} tokens, one layer; vs torch sdpa fp32", 1e3 * gpu_time_ms(run),
                0.0, flops, torch_us, "torch")
            for version, run in (("v1", lambda: v1.attention(qkv, k, v, slots, lengths, out)),
                                 ("v2", lambda: v2.attention(qkv, k, v, slots, lengths, out, partials, length)))]  # fmt: skip


def shuffle_rows(model: str, pair_counts, ceilings) -> list:
    from gpu_measure import Row
    from numba import cuda

    from numba_kernels.shuffle import launch_move, upload_plan
    from numba_kernels.timing import gpu_time_ms

    c, rows, length = preset(model), [], CONTEXT // 2
    for pairs in pair_counts:
        shape = (c.n_layer, 2 * pairs, c.n_head, c.n_ctx, c.head_dim)
        k, v = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
        state = cuda.to_device(np.zeros(2 * pairs, np.int32))
        plan = upload_plan(np.arange(pairs, 2 * pairs), np.arange(pairs), np.full(pairs, length), 2 * pairs, c.n_ctx)
        us = 1e3 * gpu_time_ms(launch_move, k, v, state, plan, length)
        n_bytes = 2 * 2 * 4 * pairs * c.n_layer * c.n_head * length * c.head_dim  # K and V, read + write
        rows.append(Row("shuffle", "v1", pairs, f"{pairs} slot moves of {length} positions, all layers", us, n_bytes, 0.0,
                        ceilings.roofline_us(n_bytes, 0.0), "roofline", MARKS["shuffle"]))  # fmt: skip
    return rows


def step_rows(model: str, batches, ceilings) -> list:
    """The whole decode step of NumbaBackend: GPU time and host time apart, against the sum of its kernels' rooflines."""
    from gpu_measure import Row

    from numba_kernels import NumbaBackend
    from numba_kernels.catalog import kernels, step_plan
    from numba_kernels.timing import gpu_time_ms, host_time_ms

    config, rows, position = preset(model), [], CONTEXT // 2
    backend = NumbaBackend(config, init_weights(config, seed=0), n_slots=max(batches))
    catalog = {k.name: k for k in kernels()}
    for batch in batches:
        parts = [(w, count) for name, part, count in step_plan("new", config, batch)
                 for label, w in catalog[name].launches(config, batch, position) if part is None or label.startswith(part)]
        n_bytes, flops = sum(w.bytes * n for w, n in parts), sum(w.flops * n for w, n in parts)
        best = sum(ceilings.roofline_us(w.bytes, w.flops) * n for w, n in parts)
        gpu_us = 1e3 * gpu_time_ms(queued_step(backend, batch, position))
        host_us = 1e3 * host_time_ms(harness.decode_step(backend, batch, position))
        rows.append(Row("decode step", "new (backend)", batch, f"{config.n_layer} layers at position {position}, KV counted",
                        gpu_us, n_bytes, flops, best, "kernels' rooflines", MARKS["decode step"], host_us))  # fmt: skip
    return rows


def queued_step(backend, batch: int, position: int):
    """A decode step's launches with its inputs already on the device: nothing synchronizes, so they queue."""
    from numba import cuda

    ints = cuda.to_device(np.concatenate([np.zeros(batch), np.full(batch, position), np.arange(batch),
                                          np.full(batch, position + 1), np.arange(batch)]).astype(np.int32))  # fmt: skip
    tokens, positions, slots, lengths, last = (ints[i * batch : (i + 1) * batch] for i in range(5))
    head = backend.head
    work = backend.work

    def launch():
        from numba_kernels import elementwise as ew

        x = backend._layers(tokens, positions, slots, lengths, position + 1)  # the step minus its copies
        h = ew.layer_norm(ew.take_rows(x, last, work.last[:batch]), backend.device_weights.ln_f.g,
                          backend.device_weights.ln_f.b, backend.config.layer_norm_epsilon, work.h[:batch])  # fmt: skip
        backend.dispatch.gemm(h, head.w, head.b, work.logits[:batch])

    return launch


def main() -> int:
    args = ARGS_PARSER.parse_args()
    if simulated():
        print("NUMBA_ENABLE_CUDASIM is set: the simulator's timings mean nothing; run this on a GPU")
        return 2
    if not cuda_available():
        print("no CUDA GPU: benchmarks/gpu_kernels.py measures a GPU and writes nothing without one")
        return 2
    from gpu_measure import HEADER, measure_ceilings

    batches = (1, 16) if args.quick else BATCHES
    ceilings = measure_ceilings()
    rows = []
    for model in args.models.split(","):
        rows += gemm_rows(model, batches, ceilings)
        rows += tiled_rows(model, 1024, ceilings)
        rows += attention_rows(model, (1, 8, 64) if not args.quick else (1, 16), ceilings)
        rows += shuffle_rows(model, (1, 4) if args.quick else (1, 4, 16), ceilings)
    rows += step_rows("gpt2", (1, 8, 16, 64) if not args.quick else (1, 16), ceilings)
    body = (f"## Numba CUDA kernels on {device_name()}\n\nCommand: `{harness.command_line()}`. Date: {harness.today()}. "
            f"Ceilings measured in the same run: copy {ceilings.copy_gbs:,.0f} GB/s (1 GiB device to device, read + "
            f"write); torch fp32 matmul, TF32 off: {ceilings.fp32_gflops:,.0f} GFLOP/s at 4096^3; L2 "
            f"{ceilings.l2_bytes / 2**20:.0f} MiB (each repeat reads its inputs from HBM: they rotate through 2.5x "
            f"the L2). Old = the kernels before version 2 (v3 GEMV, tiled); dispatch = what the backend runs now. "
            f"\"of ceiling\" = the ceiling's time / ours.\n\n{HEADER}\n" + "\n".join(r.line() for r in rows))  # fmt: skip
    print(body)
    if not (args.quick or args.no_write):
        harness.write_section("gpu_kernels", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
