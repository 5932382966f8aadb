"""Tensor parallelism as real MPI jobs: ``mpiexec -n 2`` and ``-n 4`` on CPU ranks, one thread each.

The checks themselves run inside the jobs (``tests/mpi/``); these tests launch
them, read rank 0's JSON report and bound the time a failing job takes to end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
TIMEOUT_S = 120
ABORT_WITHIN_S = 30  # a failed rank ends the job well within this (about 2 s here); a hang hits TIMEOUT_S

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")


def mpirun(n: int, script: str, *args: str, mpi4py_main: bool = True) -> tuple[int, str, str, float]:
    """Run tests/mpi/<script> on n ranks; -> (status, stdout, stderr, seconds). Kills the job on timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    runner = [sys.executable, "-m", "mpi4py"] if mpi4py_main else [sys.executable]
    command = [MPIEXEC, "-n", str(n), *runner, str(ROOT / "tests" / "mpi" / script), *args]
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        out, err = job.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # mpiexec and every rank it started
        out, err = job.communicate()
        pytest.fail(f"{' '.join(command)} hung for {TIMEOUT_S} s\n{out}\n{err}")
    return job.returncode, out, err, time.perf_counter() - start


@pytest.mark.parametrize("n_ranks", [2, 4])
def test_tp_tokens_logits_and_fused_decoding_match(n_ranks):
    status, out, err, seconds = mpirun(n_ranks, "tp_equivalence.py", "--seed", "0")
    assert status == 0, f"the job failed:\n{out}\n{err}"
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 5
    for r in reports:
        assert r["world"] == n_ranks
        assert r["max_rel_logit_error"] <= 1e-5, r
        assert r["max_batch"] >= 2 and r["moves"] >= 1, f"the fused run did not fuse or shuffle: {r}"
        assert r["ragged_prompts"] == 4 and r["ragged_steps"] >= 2, f"the paged run did not chunk: {r}"
        assert len(r["comm_seconds"]) == n_ranks and min(r["comm_seconds"]) > 0
    splits = sum(r["split_requests"] for r in reports)
    split_steps, steps = sum(r["split_steps"] for r in reports), sum(r["steps"] for r in reports)
    print(f"{n_ranks} ranks, {seconds:.1f} s: greedy tokens split in {splits} of {sum(r['requests'] for r in reports)}"
          f" requests, {split_steps} of {steps} steps")  # fmt: skip
    assert split_steps <= 0.01 * steps, "greedy tokens split far more often than near-ties explain"


@pytest.mark.parametrize(
    "n_ranks, rank, where, mpi4py_main",
    [(2, 1, "step", True), (4, 3, "step", False), (4, 0, "step", True), (2, 0, "engine", False)],
)
def test_a_rank_that_raises_ends_the_job(n_ranks, rank, where, mpi4py_main):
    status, out, err, seconds = mpirun(n_ranks, "tp_abort.py", "--rank", str(rank), "--where", where, mpi4py_main=mpi4py_main)
    assert status != 0
    assert "InjectedFault" in err
    assert "no fault was raised" not in out
    assert seconds < ABORT_WITHIN_S


def test_rank0_exit_without_close_releases_the_other_ranks():
    status, out, err, seconds = mpirun(4, "tp_abort.py", "--rank", "0", "--where", "exit", mpi4py_main=False)
    assert status == 2, err
    assert seconds < ABORT_WITHIN_S
