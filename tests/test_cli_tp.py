"""`mpiexec -n 2 flover bench --tp`: the same tokens as one process, the table, and per-rank communication."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")

ARGS = ["bench", "--model", "tiny", "--policy", "fused", "--slots", "4", "--requests", "8", "--rate", "200",
        "--prompt-len", "4:10", "--output-len", "4:12", "--seed", "5", "--quiet"]  # fmt: skip


def test_tp_bench_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    tp = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "flover.cli", *ARGS, "--tp",
                         "--json", str(tmp_path / "tp.json")], capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert tp.returncode == 0, tp.stderr
    assert "fused (slots 4)" in tp.stdout and "communication over 2 ranks" in tp.stdout
    assert tp.stdout.count("fused (slots 4)") == 1, "only rank 0 prints"
    one = subprocess.run([sys.executable, "-m", "flover.cli", *ARGS, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr
    tokens = [{r["id"]: r["tokens"] for r in json.loads((tmp_path / f).read_text())["requests"]}
              for f in ("tp.json", "one.json")]  # fmt: skip
    assert tokens[0] == tokens[1]


def test_tp_rejects_instances_in_one_line():
    done = subprocess.run([sys.executable, "-m", "flover.cli", *ARGS[:4], "instances", *ARGS[5:], "--tp"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "cannot run under --tp" in done.stderr and done.stderr.count("\n") == 1
