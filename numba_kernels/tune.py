"""Time every GEMM variant on this GPU for GPT-2's shapes and write the dispatch table.

    python -m numba_kernels.tune                        # gpt2 and gpt2-xl, batch 1..64 and prefill rows
    python -m numba_kernels.tune --models gpt2 --rows 1,4,64 --out /tmp/tuning.json

For each shape (M, N, K) of a linear layer, every candidate of
``gemm.candidates()`` runs on the same random inputs; its output must equal
the naive kernel's bitwise (a variant that differs is a bug and stops the
run), and the fastest by GPU time (``timing.gpu_time_ms``) goes into the
table under this device's name. The LM head is tuned at decode batch sizes
only: a prefill computes logits for its last row alone.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from numba import cuda

from numba_kernels.device import NoCudaError, device_name, require_cuda, simulated
from numba_kernels.dispatch import TABLE_PATH, save_table, shape_key
from numba_kernels.gemm import Variant, candidates, launch
from numba_kernels.timing import gpu_time_ms
from reference.config import preset

DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_ROWS = (128, 512, 1024)


def model_shapes(model: str, rows: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(M, N, K) of every linear layer of a preset; w is [K, N]."""
    c = preset(model)
    layers = [(3 * c.n_embd, c.n_embd), (c.n_embd, c.n_embd), (c.d_mlp, c.n_embd), (c.n_embd, c.d_mlp)]
    shapes = [(m, n, k) for m in rows for n, k in layers]
    shapes += [(m, c.vocab_size, c.n_embd) for m in rows if m <= max(DECODE_ROWS)]
    return shapes


def tune_shape(m: int, n: int, k: int, seed: int = 0) -> tuple[Variant, dict[Variant, float]]:
    """The fastest variant for one shape, and every candidate's time in ms."""
    rng = np.random.default_rng(seed)
    x = cuda.to_device(rng.standard_normal((m, k), dtype=np.float32))
    w = cuda.to_device(rng.standard_normal((k, n), dtype=np.float32))
    b = cuda.to_device(rng.standard_normal(n, dtype=np.float32))
    out = cuda.device_array((m, n), np.float32)
    times, reference = {}, None
    for variant in candidates():
        launch(variant, x, w, b, out)
        got = out.copy_to_host()
        if reference is None:
            reference = got
        elif not np.array_equal(got, reference):
            raise AssertionError(f"{variant} differs from {candidates()[0]} at M={m} N={n} K={k}")
        times[variant] = gpu_time_ms(launch, variant, x, w, b, out, reps=10)
    return min(times, key=times.get), times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,gpt2-xl", help="presets whose shapes to tune")
    p.add_argument("--rows", default=",".join(map(str, DECODE_ROWS + PREFILL_ROWS)), help="values of M")
    p.add_argument("--out", default=str(TABLE_PATH), help="the JSON table (other devices' entries are kept)")
    args = p.parse_args(argv)
    try:
        require_cuda()
    except NoCudaError as error:
        print(error, file=sys.stderr)
        return 2
    if simulated():
        print("tuning needs a real GPU: the simulator's timings mean nothing", file=sys.stderr)
        return 2
    rows = tuple(int(r) for r in args.rows.split(","))
    shapes = sorted({s for model in args.models.split(",") for s in model_shapes(model, rows)})
    device, table = device_name(), {}
    print(f"tuning {len(shapes)} shapes x {len(candidates())} variants on {device}")
    for m, n, k in shapes:
        best, times = tune_shape(m, n, k)
        table[shape_key(m, n, k)] = best
        runner_up = sorted(times.values())[1] if len(times) > 1 else times[best]
        print(f"{m:>5} x {n:>6} x {k:>5}  {str(best):<24} {times[best] * 1e3:9.1f} us  (next {runner_up * 1e3:.1f} us)")
    save_table(table, device, args.out)
    print(f"wrote {len(table)} entries for {device} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
