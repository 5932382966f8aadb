"""Tensor parallelism with the numba inner (``numba_kernels.TPShard``): a world of one rank in this process is
bitwise the single-process NumbaBackend, and ``mpiexec -n 2`` under the simulator gives one process's tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

try:
    from mpi4py import MPI
except (ImportError, RuntimeError) as error:  # no mpi4py, or no MPI library for it to load
    pytest.skip(f"no MPI: {error}", allow_module_level=True)
from test_tp_mpi import MPIEXEC, mpirun  # noqa: E402

from mpi_tp import launch  # noqa: E402
from numba_kernels import NO_CUDA, NumbaBackend, cuda_available  # noqa: E402
from numba_kernels.simulator import quick_switching  # noqa: E402
from reference import GPTConfig, KVShape, Lane, init_weights  # noqa: E402

pytestmark = pytest.mark.skipif(not cuda_available(), reason=NO_CUDA)

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_ctx=8)


@pytest.fixture(autouse=True, scope="module")
def _quick_simulator():
    with quick_switching():
        yield


def test_one_rank_is_bitwise_the_numba_backend():
    """(acc + 0) + b == acc + b: the row-parallel layers' reduction and bias change no bit at one rank."""
    weights = init_weights(CONFIG, seed=2, std=0.3)
    tp = launch(CONFIG, weights, 3, inner="numba", comm=MPI.COMM_SELF)
    single = NumbaBackend(CONFIG, weights, n_slots=3)
    try:
        for lanes in ([Lane.of([0], [3, 1, 4], 0)], [Lane.of([0], [1], 3), Lane.of([2], [5, 9], 0)]):
            assert np.array_equal(tp.step(lanes), single.step(lanes))
    finally:
        tp.close()


def test_paged_kv_is_refused_naming_the_inner():
    with pytest.raises(ValueError, match="slots of n_ctx 8 positions, got blocks of 4; use inner='numpy'"):
        launch(CONFIG, init_weights(CONFIG), KVShape(6, 4), inner="numba", comm=MPI.COMM_SELF)


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_two_ranks_give_one_process_tokens():
    status, out, err, seconds = mpirun(2, "tp_numba.py", mpi4py_main=False)  # the script sets MPICH's polling first
    assert status == 0, f"the job failed:\n{out}\n{err[-3000:]}"
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["world"] == 2, out
    assert len(reports[0]["tokens"]) == 2 and min(reports[0]["comm_seconds"]) > 0
