"""Everything one tensor-parallel rank sends or receives, on NumPy buffers, timed.

Three kinds of traffic, all buffer-based (no pickled objects on the step path):

- ``bcast``: rank 0 broadcasts each command (a small int64 header, then its
  int64 payload) so that every rank runs the same step on its shard.
- ``reduce_sum``: the one reduction after each RowParallelLinear.
- ``gather_columns``: the vocabulary-parallel logits, gathered on rank 0.

Why the reduction is an Allgather followed by a sum in rank order, not
``Allreduce``: fused decoding must be bitwise equal to serial decoding, so an
element of the sum must be rounded the same way whether the step carries 1
request or 32. MPI promises no such thing: an implementation picks its
algorithm by message size (recursive doubling for short messages, reduce-scatter
then allgather for long ones, a ring across nodes), and each algorithm adds the
ranks' parts in its own order. Nor does MPI promise that all ranks get the same
bits, and the ranks' copies of the residual stream must never drift apart.
(With MPICH 5.0 on one node we saw Allreduce agree with itself across counts,
but with 4 ranks it adds (p0 + p1) + (p2 + p3), not the rank order, and that
choice is MPICH's to change.) Summing p0 + p1 + ... + p(N-1) ourselves, element
by element, fixes the order on every rank for every batch. The price is N
times the bytes of one partial sum per rank: [B, C] floats, a few kB to a few
hundred kB, against megabytes of weights read per layer. ``deterministic=False``
uses ``Allreduce`` instead, for comparison: on gpt2-medium with two CPU ranks
the two decode at the same speed within the noise of the measurement
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI


class TPComm:
    """One rank's view of the world; ``seconds`` counts time in the step's MPI calls.

    Time a rank spends waiting for the next command (its header broadcast) is
    time rank 0 spent elsewhere, not communication, and is not counted.
    """

    def __init__(self, comm: MPI.Comm, deterministic: bool = True) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world = comm.Get_size()
        self.deterministic = deterministic
        self.seconds = 0.0

    def bcast(self, a: np.ndarray) -> np.ndarray:
        """Broadcast ``a`` from rank 0 into ``a`` on every rank, in place."""
        start = time.perf_counter()
        self.comm.Bcast(a, root=0)
        self.seconds += time.perf_counter() - start
        return a

    def wait_command(self, header: np.ndarray) -> np.ndarray:
        """The header broadcast, as seen by a rank that waits for rank 0's next command (not timed)."""
        self.comm.Bcast(header, root=0)
        return header

    def reduce_sum(self, partial: np.ndarray) -> np.ndarray:
        """Sum of every rank's ``partial`` [n, C], the same bits on every rank: -> [n, C]."""
        if self.world == 1:
            return partial
        start = time.perf_counter()
        partial = np.ascontiguousarray(partial, np.float32)
        if self.deterministic:
            parts = np.empty((self.world, *partial.shape), np.float32)  # [N, n, C]
            self.comm.Allgather(partial, parts)
            total = parts[0]
            for part in parts[1:]:
                total += part  # ((p0 + p1) + p2) + ...: rank order, one element at a time
        else:
            total = np.empty_like(partial)
            self.comm.Allreduce(partial, total, op=MPI.SUM)
        self.seconds += time.perf_counter() - start
        return total

    def gather_columns(self, local: np.ndarray, bounds: np.ndarray) -> np.ndarray | None:
        """Rank r's columns bounds[r] .. bounds[r+1] - 1 of the logits, joined on rank 0.

        local: [n, bounds[r+1] - bounds[r]] on rank r -> [n, bounds[-1]] on rank 0, None elsewhere.
        """
        if self.world == 1:
            return local
        start = time.perf_counter()
        n = local.shape[0]
        counts = n * np.diff(bounds)  # floats from each rank
        gathered = np.empty(n * int(bounds[-1]), np.float32) if self.rank == 0 else None
        recv = [gathered, counts, n * bounds[:-1], MPI.FLOAT] if self.rank == 0 else None
        self.comm.Gatherv(np.ascontiguousarray(local, np.float32), recv, root=0)
        out = None
        if self.rank == 0:
            out = np.empty((n, int(bounds[-1])), np.float32)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                out[:, lo:hi] = gathered[n * lo : n * hi].reshape(n, hi - lo)  # rank's block is [n, hi - lo]
        self.seconds += time.perf_counter() - start
        return out

    def gather_seconds(self) -> np.ndarray | None:
        """[N] communication seconds of every rank, on rank 0; None elsewhere."""
        mine = np.array([self.seconds], np.float64)
        out = np.empty(self.world, np.float64) if self.rank == 0 else None
        self.comm.Gather(mine, out, root=0)
        return out
