"""The benchmark scripts still run: each one's --quick mode on the tiny preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["serving_cpu.py", "fusion_ceiling.py", "decode_cpu.py"])
def test_quick_run(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|" in done.stdout, "a table was printed"
    if script == "serving_cpu.py":
        assert "token-identical to fused: every run" in done.stdout
