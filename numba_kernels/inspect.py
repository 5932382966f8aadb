"""Static checks of every kernel without a GPU: compile, assemble, count; then the roofline estimate.

    python -m numba_kernels.inspect                     # sm_80 and sm_90, every kernel, markdown tables
    python -m numba_kernels.inspect --arch sm_90 --json out.json
    python -m numba_kernels.inspect --kernels gemv      # names containing "gemv"

Each kernel of ``catalog.kernels()`` is compiled at the signature the
backend launches it with by numba-cuda's ``compile_ptx`` (NVVM from the
``nvidia-nvvm`` package), and its PTX assembled by ``ptxas -v`` (from
``nvidia-cuda-nvcc``: an older system ptxas rejects newer PTX). One row per
kernel and architecture: registers, stack and spill bytes, static shared
memory, f64 instructions (a stray Python float makes the arithmetic double),
``fma.rn.f32`` instructions (every GEMM and attention sum is a chain of
``cuda.fma``), and the occupancy those imply for the kernel's block size.

Then each kernel's launches in a GPT-2 decode step, priced by
``roofline.estimate`` for an H100 with the occupancy just found, and the
whole step for the old kernels and the new. Under the CUDA simulator there
is no compiler: the command reruns itself without NUMBA_ENABLE_CUDASIM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ARCHS = ("sm_80", "sm_90")
SM_LIMITS = {  # registers, shared bytes, threads, blocks a multiprocessor holds (CUDA occupancy calculator)
    "sm_80": SimpleNamespace(regs=65536, smem=167936, threads=2048, blocks=32),
    "sm_90": SimpleNamespace(regs=65536, smem=233472, threads=2048, blocks=32),
}
SMEM_RESERVED = 1024  # bytes the runtime keeps per block on sm_80 and later
F64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z][\w.]*\.f64\b", re.M)


@dataclass(frozen=True, slots=True)
class Static:
    kernel: str
    source: str
    function: str  # the kernel's Python name
    reduction: bool  # a GEMM or attention sum
    arch: str
    registers: int
    stack_bytes: int
    spill_bytes: int  # stores + loads
    shared_bytes: int  # static + the launch's dynamic shared memory
    f64: int
    fma_f32: int
    threads: int
    blocks_per_sm: int
    occupancy: float


def ptxas_path() -> str:
    """ptxas of the nvidia-cuda-nvcc wheel (it accepts the PTX NVVM writes), else $PTXAS, else the system's."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    with contextlib.suppress(ImportError):
        import nvidia

        for root in nvidia.__path__:
            for candidate in Path(root).glob("*/bin/ptxas"):
                return str(candidate)
    found = shutil.which("ptxas")
    if found is None:
        raise FileNotFoundError("no ptxas: pip install nvidia-cuda-nvcc (the cuda extra), or set PTXAS")
    return found


@contextlib.contextmanager
def target(cc: tuple[int, int]):
    """numba-cuda compiles a kernel's device functions for the current device; without a GPU, pretend one."""
    from numba.cuda import dispatcher

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def blocks_per_sm(arch: str, registers: int, shared: int, threads: int) -> int:
    limit = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # registers are allocated 256 a warp
    by_regs = (limit.regs // per_warp) // warps
    by_smem = limit.smem // (math.ceil((shared + SMEM_RESERVED) / 128) * 128) if shared else limit.blocks
    return min(by_regs, by_smem, limit.threads // (warps * 32), limit.blocks)


def assemble(ptx: str, arch: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run([ptxas_path(), "-v", f"-arch={arch}", str(path), "-o", str(path.with_suffix(".cubin"))],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"ptxas failed for {arch}: {done.stderr.strip()[-2000:]}")
    return parse_ptxas(done.stderr + done.stdout)


def parse_ptxas(info: str) -> dict[str, int]:
    """Registers, stack frame, spill (stores + loads) and static shared bytes from ``ptxas -v`` output."""

    def field(pattern: str) -> int:
        return sum(int(v) for v in re.findall(pattern, info))

    return dict(registers=field(r"Used (\d+) registers"), stack=field(r"(\d+) bytes stack frame"),
                spills=field(r"(\d+) bytes spill stores") + field(r"(\d+) bytes spill loads"),
                smem=field(r"(\d+) bytes smem"))  # fmt: skip


def inspect_all(kernels, archs, config, jobs: int) -> list[Static]:
    """Every (kernel, architecture), each distinct compiled kernel once, on ``jobs`` processes (compiling is slow)."""
    tasks = [(i, arch) for i in range(len(kernels)) for arch in archs]
    keys = [(id(kernels[i].compiled()), kernels[i].signature, arch) for i, arch in tasks]  # factories are cached
    first = {key: task for task, key in reversed(list(zip(tasks, keys)))}  # the first task of each distinct compile
    unique = list(first.values())
    if jobs <= 1 or len(unique) < 4:
        results = [_compiled(kernels[i], arch) for i, arch in unique]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        global _KERNELS  # the workers inherit the kernels by fork: closures do not pickle
        _KERNELS = kernels
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_task, unique, chunksize=max(1, len(unique) // (4 * jobs))))
    found = dict(zip(first, results))
    return [static_row(kernels[i], arch, config, *found[key]) for (i, arch), key in zip(tasks, keys)]


_KERNELS: list = []


def _compile_task(task):
    return _compiled(_KERNELS[task[0]], task[1])


def _compiled(kernel, arch: str) -> tuple[dict[str, int], int, int]:
    """-> (ptxas figures, f64 instructions, fma.rn.f32 instructions) of the kernel compiled for ``arch``."""
    from numba.cuda import compile_ptx

    cc = (int(arch[3]), int(arch[4:]))
    with target(cc):
        ptx, _ = compile_ptx(kernel.compiled().py_func, kernel.signature, cc=cc)
    return assemble(ptx, arch), len(F64.findall(ptx)), ptx.count("fma.rn.f32")


def static_row(kernel, arch: str, config, info: dict[str, int], f64: int, fma: int) -> Static:
    shared = info["smem"] + kernel.dynamic_shared(config)
    blocks = blocks_per_sm(arch, info["registers"], shared, kernel.threads)
    return Static(kernel.name, kernel.source, kernel.compiled().py_func.__name__, kernel.reduction, arch,
                  info["registers"], info["stack"], info["spills"], shared, f64, fma, kernel.threads, blocks,
                  blocks * math.ceil(kernel.threads / 32) / 64)  # fmt: skip


def inspect_kernel(kernel, arch: str, config) -> Static:
    return static_row(kernel, arch, config, *_compiled(kernel, arch))


# ------------------------------------------------------------------ the report


def static_table(rows: list[Static]) -> str:
    archs = sorted({r.arch for r in rows})
    by_kernel: dict[tuple[str, str], dict[str, Static]] = {}
    for r in rows:
        by_kernel.setdefault((r.kernel, r.source), {})[r.arch] = r
    head = " | ".join(f"{a}: regs, stack/spill B, smem B, occupancy" for a in archs)
    lines = [f"| kernel | source | threads | f64 | fma.rn.f32 | {head} |", "|---|---|---:|---:|---:|" + "---|" * len(archs)]
    for (name, source), per_arch in by_kernel.items():
        first = next(iter(per_arch.values()))
        cells = " | ".join(f"{s.registers}, {s.stack_bytes}/{s.spill_bytes}, {s.shared_bytes}, {s.occupancy:.0%}"
                           for s in (per_arch[a] for a in archs if a in per_arch))  # fmt: skip
        lines.append(f"| {name} | {source} | {first.threads} | {first.f64} | {first.fma_f32} | {cells} |")
    return "\n".join(lines)


def priced(kernels, statics: dict[str, Static], config, batches, context):
    """-> [(kernel, launch label, batch, Work, Estimate)] with each kernel's sm_90 occupancy."""
    from numba_kernels.roofline import estimate

    out, seen = [], set()
    for kernel in kernels:
        if kernel.launches is None or kernel.name not in statics:
            continue
        for batch in batches:
            for label, work in kernel.launches(config, batch, context):
                if (kernel.name, label) not in seen:  # a launch that does not depend on the batch, once
                    seen.add((kernel.name, label))
                    out.append((kernel, label, batch, work, estimate(work, statics[kernel.name].blocks_per_sm)))
    return out


def roofline_table(rows) -> str:
    from numba_kernels.roofline import H100, ideal_us

    lines = ["| kernel | source | launch | MB | blocks | KB in flight a block | chain us | estimate us | bound | "
             "roofline us | of HBM bandwidth |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for kernel, label, _, work, est in rows:
        lines.append(f"| {kernel.name} | {kernel.source} | {label} | {work.bytes / 1e6:.2f} | {work.blocks} | "
                     f"{work.inflight / 1e3:.1f} | {est.chain_us:.2f} | {est.us:.2f} | {est.bound} | "
                     f"{ideal_us(work, H100):.2f} | {est.of_bandwidth(work, H100):.0%} |")  # fmt: skip
    return "\n".join(lines)


def step_table(rows, config, batches) -> tuple[str, dict]:
    from numba_kernels.catalog import step_plan
    from numba_kernels.roofline import H100, ideal_us

    found = {(k.name, label.split(" ")[0] if k.name.startswith("gemm") else None, b): (w, e) for k, label, b, w, e in rows}
    lines = ["| kernels | batch | launches | MB | estimate us | roofline us | roofline / estimate |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    summary = {}
    for version in ("old", "new"):
        for batch in batches:
            plan = step_plan(version, config, batch)
            if any((name, part, batch) not in found for name, part, _ in plan):
                continue
            parts = [(found[name, part, batch], count) for name, part, count in plan]
            est = sum(e.us * n for (_, e), n in parts)
            ideal = sum(ideal_us(w, H100) * n for (w, _), n in parts)
            mb = sum(w.bytes * n for (w, _), n in parts) / 1e6
            summary[f"{version} batch {batch}"] = dict(estimate_us=est, roofline_us=ideal, launches=sum(n for _, n in parts))
            lines.append(f"| {version} | {batch} | {sum(n for _, n in parts)} | {mb:.0f} | {est:,.0f} | {ideal:,.0f} | "
                         f"{ideal / est:.0%} |")  # fmt: skip
    return "\n".join(lines), summary


def report(archs=ARCHS, names: str = "", model: str = "gpt2", batches=(1, 8), context: int = 1024,
           every: bool = False, jobs: int = 1, backend_only: bool = False) -> tuple[str, dict]:  # fmt: skip
    """-> (markdown, everything as a dict)."""
    from numba_kernels.catalog import kernels
    from numba_kernels.roofline import H100
    from reference.config import preset

    config = preset(model)
    chosen = [k for k in kernels() if (not names or any(n in k.name for n in names.split(",")))
              and (k.tags or not backend_only)]  # fmt: skip
    statics = inspect_all(chosen, archs, config, jobs)
    on_h100 = {s.kernel: s for s in statics if s.arch == "sm_90"}
    rows = priced(chosen, on_h100, config, batches, context)
    step, summary = step_table(rows, config, batches)
    shown = [r for r in rows if every or r[0].tags]  # the backend's kernels, old and new
    text = "\n\n".join([
        f"Static checks ({', '.join(archs)}; numba-cuda compile_ptx, ptxas -v). Occupancy: resident warps of 64, "
        "from registers, shared memory (static + the launch's dynamic) and the block size.",
        static_table(statics),
        f"Roofline estimates for an {H100.name}, {model} decode, context {context} (a model, not a measurement: "
        "see numba_kernels/roofline.py). Figures: " + "; ".join(H100.sources) + ".",
        roofline_table(shown),
        f"One {model} decode step, every launch (old: the kernels before v2; new: the backend's kernels now):",
        step,
    ])  # fmt: skip
    roofline = [dict(kernel=k.name, source=k.source, launch=label, batch=b, **asdict(w),
                     **{f"estimate_{key}": v for key, v in asdict(e).items()}) for k, label, b, w, e in rows]  # fmt: skip
    everything = dict(static=[asdict(s) for s in statics], step=summary, roofline=roofline)
    return text, everything


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: sm_80, sm_90")
    p.add_argument("--kernels", default="", help="only kernels whose name contains one of these (comma-separated)")
    p.add_argument("--model", default="gpt2", help="the preset whose decode step is priced")
    p.add_argument("--batches", default="1,8", help="decode batch sizes to price")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--all", action="store_true", help="price every variant, not only the backend's old and new kernels")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes that compile")
    p.add_argument("--backend", action="store_true", help="only the kernels the backend runs (old and new), not "
                   "every tuning candidate")  # fmt: skip
    args = p.parse_args(argv)
    from numba_kernels.device import simulated

    if simulated():  # the simulator has no compiler: run again without it
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        return subprocess.run([sys.executable, "-m", "numba_kernels.inspect", *(argv or sys.argv[1:])], env=env).returncode
    archs = tuple(a.strip() for a in args.arch.split(","))
    unknown = [a for a in archs if a not in SM_LIMITS]
    if unknown:
        print(f"unknown architecture {unknown[0]!r}; choose from {', '.join(SM_LIMITS)}", file=sys.stderr)
        return 2
    batches = tuple(int(b) for b in args.batches.split(","))
    text, everything = report(archs, args.kernels, args.model, batches, every=args.all, jobs=args.jobs,
                              backend_only=args.backend)  # fmt: skip
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
