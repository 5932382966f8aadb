"""Static checks of the kernels, without a GPU: compiled for sm_90 by NVVM, assembled by ptxas.

The kernels the backend runs and ran (``--backend``: old and new versions; every tuning candidate, and
sm_80, are in ``python -m numba_kernels.inspect`` and benchmarks/RESULTS.md). Each: no f64 instruction (a
stray Python float turns float32 arithmetic into double), no spill and no stack frame (its local arrays live
in registers), at least one block fits a multiprocessor; every GEMM and attention sum is a chain of
fma.rn.f32. And the roofline model behind the estimates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from numba_kernels.inspect import F64, blocks_per_sm, parse_ptxas
from numba_kernels.roofline import H100, Work, estimate

ROOT = Path(__file__).resolve().parent.parent
NOT_IN_CATALOG = {"hold_kernel"}  # timing.py's sleeper, never part of a step


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """``python -m numba_kernels.inspect --arch sm_90 --backend --json``, run once (without the simulator)."""
    out = tmp_path_factory.mktemp("inspect") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    command = [sys.executable, "-m", "numba_kernels.inspect", "--arch", "sm_90", "--backend", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_no_kernel_computes_in_f64_spills_or_keeps_a_stack(inspected):
    rows = inspected[0]["static"]
    assert rows
    for r in rows:
        assert r["f64"] == 0, f"{r['kernel']}: {r['f64']} f64 instructions"
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, f"{r['kernel']}: local memory {r}"
        assert r["blocks_per_sm"] >= 1, f"{r['kernel']}: no block fits a multiprocessor {r}"


def test_every_gemm_and_attention_sum_is_fused_multiply_add(inspected):
    sums = [r for r in inspected[0]["static"] if r["reduction"]]
    assert {r["source"].split()[0] for r in sums} >= {"gemm.py", "gemm_staged.py", "attention.py", "attention_chunked.py"}
    for r in sums:
        assert r["fma_f32"] > 0, f"{r['kernel']} sums without fma.rn.f32"


def test_every_kernel_of_the_package_is_in_the_catalog():
    from numba_kernels.catalog import kernels

    defined = set()
    for path in (ROOT / "numba_kernels").glob("*.py"):
        defined |= set(re.findall(r"@cuda\.jit\n\s*def (\w+)", path.read_text()))
    assert len(defined) > 10
    assert defined - NOT_IN_CATALOG <= {k.compiled().py_func.__name__ for k in kernels()}


def test_new_decode_step_has_fewer_launches_and_a_lower_estimate(inspected):
    step = inspected[0]["step"]
    for batch in (1, 8):
        old, new = step[f"old batch {batch}"], step[f"new batch {batch}"]
        assert new["launches"] < old["launches"]
        assert new["estimate_us"] < old["estimate_us"]
        assert new["roofline_us"] <= new["estimate_us"]
    assert "| kernel | source | threads | f64 | fma.rn.f32 |" in inspected[1]


def test_f64_and_ptxas_figures_are_read_as_written():
    assert len(F64.findall("\tadd.f64 \t%fd2, %fd1, 0d3FE0;\n\tcvt.f64.f32 \t%fd1, %f1;\n\tfma.rn.f32 \t%f3, %f1;")) == 2
    assert F64.findall("\tld.global.f32 \t%f1, [%rd1];\n") == []
    info = parse_ptxas("ptxas info    : Function properties for k\n    16 bytes stack frame, 8 bytes spill stores, "
                       "12 bytes spill loads\nptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem")  # fmt: skip
    assert info == dict(registers=40, stack=16, spills=20, smem=2048)
    assert blocks_per_sm("sm_90", 32, 0, 128) == 16  # by threads: 2048 / 128
    assert blocks_per_sm("sm_90", 255, 0, 128) == 2  # by registers: 65536 / (256 x 128)
    assert blocks_per_sm("sm_80", 32, 100_000, 128) == 1  # by shared memory


def test_roofline_binds_by_bytes_in_flight_and_by_the_serial_chain():
    latency = Work(bytes=2e6, flops=0, blocks=12, inflight=1024, chain=0)  # 12 KB in flight: 20 GB/s
    est = estimate(latency, blocks_per_sm=8)
    assert est.bound == "latency" and est.of_bandwidth(latency, H100) < 0.01
    streaming = Work(bytes=2e8, flops=0, blocks=100_000, inflight=16_384, chain=0)
    assert estimate(streaming, blocks_per_sm=8).bound == "memory"
    gemv = Work(bytes=9.4e6, flops=2 * 768 * 3072, blocks=96, inflight=16_384, chain=3072)  # mlp_proj at batch 1
    est = estimate(gemv, blocks_per_sm=2)
    assert est.bound == "chain" and abs(est.us - (3072 * 4 / 1.98e3 + 0.6)) < 1e-6, "the chain, after one latency"
