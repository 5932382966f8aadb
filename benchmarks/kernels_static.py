"""The Numba CUDA kernels as a compiler sees them, and what a roofline model expects of them on an H100.

    python benchmarks/kernels_static.py             # sm_80 and sm_90 -> the kernels_static section of RESULTS.md
    python benchmarks/kernels_static.py --quick     # sm_90 only; prints, writes nothing

No GPU is used: ``python -m numba_kernels.inspect`` compiles every kernel
(old versions and new) with NVVM and assembles it with ptxas, then prices a
GPT-2 decode step's launches with ``numba_kernels.roofline``. Every figure
here is static or estimated; none is a measured speed.
"""

from __future__ import annotations

import os
import sys

import harness  # first of ours: puts the repository on sys.path, loads no NumPy

ARGS = harness.parser(__doc__, quick="sm_90 only; prints, writes nothing").parse_args()
harness.start()

from numba_kernels.device import simulated  # noqa: E402
from numba_kernels.inspect import ARCHS, report  # noqa: E402


def main() -> int:
    if simulated():
        print("NUMBA_ENABLE_CUDASIM is set: the simulator has no compiler; run this without it")
        return 2
    archs = ("sm_90",) if ARGS.quick else ARCHS
    text, everything = report(archs, jobs=os.cpu_count() or 1)
    step = everything["step"]
    headline = "; ".join(f"batch {b}: {step[f'old batch {b}']['estimate_us']:,.0f} us in {step[f'old batch {b}']['launches']} "
                         f"launches (old) -> {step[f'new batch {b}']['estimate_us']:,.0f} us in "
                         f"{step[f'new batch {b}']['launches']} (new), roofline {step[f'new batch {b}']['roofline_us']:,.0f} us"
                         for b in (1, 8))  # fmt: skip
    body = (f"## Numba CUDA kernels, static checks and roofline estimates (no GPU)\n\nCommand: "
            f"`{harness.command_line()}` (runs `python -m numba_kernels.inspect`). Date: {harness.today()}. "
            f"Machine: {harness.machine()}; no GPU: compiled and assembled, not run. Estimated gpt2 decode step on an "
            f"H100 (a model, not a measurement): {headline}.\n\n{text}")  # fmt: skip
    print(body)
    if not (ARGS.quick or ARGS.no_write):
        harness.write_section("kernels_static", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
