"""The benchmark scripts still run: each one's --quick mode on the tiny preset."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize("script", ["serving_cpu.py", "fusion_ceiling.py", "decode_cpu.py", "simulator_accuracy.py"])
def test_quick_run(script):
    done = run(script, "--quick")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|" in done.stdout, "a table was printed"
    if script == "serving_cpu.py":
        for experiment in ("layouts", "prefill modes", "policies"):
            assert f"token-identical across {experiment} and rounds: yes" in done.stdout
    if script == "simulator_accuracy.py":
        assert "mean latency: median absolute error" in done.stdout


MPI = importlib.util.find_spec("mpi4py") and (shutil.which("mpiexec", path=str(Path(sys.executable).parent))
                                              or shutil.which("mpiexec"))  # fmt: skip


@pytest.mark.skipif(not MPI, reason="no mpi4py or no mpiexec")
def test_tp_scaling_quick_run():
    done = run("tp_scaling.py", "--quick", "--variants", "1,2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 2 ranks" in done.stdout


def test_gpu_kernels_without_a_gpu_says_so_and_exits_2():
    from numba_kernels.device import cuda_available, simulated

    if cuda_available() and not simulated():
        pytest.skip("a GPU is here: the script would measure it")
    without_simulator = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=without_simulator)  # fmt: skip
    assert done.returncode == 2 and "no CUDA GPU" in done.stdout, done.stderr[-2000:]
