"""Tensor parallelism over MPI: GPT-2 sharded Megatron-style over the ranks of ``mpiexec``.

    mpiexec -n 2 python -m mpi4py my_script.py       # every rank runs the script

    from mpi_tp import launch
    backend = launch(config, weights, n_slots)       # ranks 1..N-1 serve inside this call; or a KVShape
    if backend is not None:                          # rank 0: an ordinary Backend
        ...engine or reference.generate(backend, ...)...
        backend.close()

From the command line (rank 0 prints; every rank computes its shard):

    mpiexec -n 2 flover bench --tp --policy fused ...
    mpiexec -n 2 python -m mpi4py -m flover.cli generate --tp ...   # -m mpi4py: abort on any error

Across nodes, with MPICH's launcher (hydra), passwordless ssh and the same
virtual environment at the same path on every node:

    $ cat hosts
    node1:2
    node2:2
    $ mpiexec -f hosts -n 4 python -m mpi4py -m flover.cli bench --tp ...

A rank that waits (for a reduction, or for rank 0's next command) polls and
keeps its core busy, so give each rank a core of its own and one thread
(``OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1``); with more ranks than cores,
MPICH's ``MPIR_CVAR_POLLS_BEFORE_YIELD`` makes a waiting rank yield its core.

Files: ``shard.py`` (which rows and columns each rank keeps), ``comm.py`` (the
broadcasts, the reduction after each RowParallelLinear, the gather of logits),
``model.py`` (one rank's ragged step), ``backend.py`` (rank 0's Backend, the
STEP and MOVE commands, and the other ranks' loop).

Embedding and LM head: vocabulary-parallel (the default). GPT-2's tied [V, C]
table is the largest single weight: about 15% of the weights a gpt2-medium
decode step reads (50257 x 1024 of 354M), 31% of gpt2's. A decode step at small batch reads every weight
once, so its time follows the bytes a rank reads. Replicated, rank 0 alone
computes the LM head while the other ranks wait for its next command, which
caps two ranks at 1/(0.85/2 + 0.15) = 1.74x before any communication. Split
by vocabulary rows, each rank computes 1/N of the logits, at the price of one
gather of [B, V/N] logits to rank 0 and one [B, C] reduction for the
embedding lookup. Measured (``benchmarks/tp_scaling.py``, gpt2-medium, two
ranks with one thread each against one rank, see ``benchmarks/RESULTS.md``):
vocabulary-parallel 1.87x the throughput at batch 1 and 1.91x at batch 16,
replicated 1.65x and 1.74x.

The ``inner`` argument of ``launch`` picks the math on each rank: ``numpy``
(``mpi_tp.model.NumpyShard``: the batch-invariant Numba CPU kernels, over
slots or paged KV blocks) or ``numba`` (``numba_kernels.TPShard``: one GPU per
rank, rank r on GPU r mod the GPU count, KV in slots): it receives a
``ShardWeights`` on the host, keeps it and its KV slots on its GPU, and hands
[N, C] host arrays to ``comm.reduce_sum`` after each RowParallelLinear.
Under the CUDA simulator every rank simulates one GPU, so ``mpiexec -n 2``
runs it without a GPU (``tests/test_tp_numba.py``).
"""

import reference  # noqa: F401  (first: it sets the thread settings NumPy's BLAS reads as it loads)
from mpi_tp.backend import TPBackend, install_abort_hook, launch, serve
from mpi_tp.comm import TPComm
from mpi_tp.model import NumpyShard, Shard
from mpi_tp.shard import ColumnParallelLinear, RowParallelLinear, ShardWeights, check_world, shard_weights, vocab_bounds

__all__ = [
    "ColumnParallelLinear", "NumpyShard", "RowParallelLinear", "Shard", "ShardWeights", "TPBackend", "TPComm",
    "check_world", "install_abort_hook", "launch", "serve", "shard_weights", "vocab_bounds",
]  # fmt: skip
