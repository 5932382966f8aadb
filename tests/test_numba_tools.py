"""The GPU-only tools refuse to run without a GPU, with exit status 2 and one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from numba_kernels.device import simulated
from numba_kernels.tune import PREFILL_ROWS, main, model_shapes

ROOT = Path(__file__).resolve().parent.parent


def test_tune_covers_every_linear_and_the_head_at_decode_sizes_only():
    shapes = model_shapes("gpt2", (1, 1024))
    assert (1, 2304, 768) in shapes and (1024, 768, 3072) in shapes
    assert (1, 50257, 768) in shapes
    assert not any(n == 50257 and m in PREFILL_ROWS for m, n, _ in shapes), "a prefill's head has one row"


@pytest.mark.skipif(not simulated(), reason="on a GPU this would run the whole tuning")
def test_tune_refuses_the_simulator(capsys):
    assert main([]) == 2
    assert "simulator" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["gpu_kernels.py", "gpu_policies.py", "kernels_static.py"])
def test_gpu_scripts_exit_2_under_the_simulator_and_write_nothing(script):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert len(run.stdout.strip().splitlines()) == 1 and "NUMBA_ENABLE_CUDASIM" in run.stdout
    assert (results.read_text() if results.exists() else None) == before


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
