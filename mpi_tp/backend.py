"""The tensor-parallel Backend: rank 0 serves the engine, every other rank mirrors each call.

Rank 0 holds a ``TPBackend`` (a ``reference.backend.LaneBackend``: ``step``
and ``move``, and the teaching wrappers ``prefill``, ``decode`` and
``move_slots`` written with them). Each call broadcasts a command, a header
int64 [4] = (op, a, b, c) and then an int64 payload whose shape the header
fixes, and runs the same step as the other ranks, which loop in ``serve``:
wait for a command, run it on their shard, wait again. Logits come back to
rank 0 only.

    op        header (a, b, c)   payload                   the step on every rank
    STEP      N rows, L lanes,   [3N + L + L*M]: tokens,   shard.step(rows), then gather
              M blocks a lane    positions, lane [N] each,  the logit columns: [L, V]
                                 last [L], block_table
                                 [L, M] row by row
    MOVE      n pairs            [3, n] src, dst, lengths  shard.move (each rank moves its own heads)
    TIMES     -                  none                      gather each rank's communication seconds
    SHUTDOWN  -                  none                      leave the loop

The STEP payload is ``reference.lanes.Rows`` flattened (its block size is
the KV shape's, which every rank knows from ``launch``); rank 0 decodes it
too, so every rank computes from the same arrays.

Rank 0 checks every argument a user can get wrong before it broadcasts (with
``plan_rows``, the one check of every backend), so a bad request raises
ValueError on rank 0 and the other ranks never see it. An exception inside a
step is different: the ranks are then out of step, so the job must end;
``install_abort_hook`` makes any uncaught exception on any rank call
``MPI.COMM_WORLD.Abort(1)`` (as ``python -m mpi4py`` does).
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from mpi_tp.comm import TPComm
from mpi_tp.model import NumpyShard, Shard
from mpi_tp.shard import check_world, shard_weights, vocab_bounds
from reference import GPT2Weights, GPTConfig
from reference.backend import LaneBackend
from reference.kv import KVShape, as_kv_shape
from reference.lanes import Lane, Rows, plan_rows

SHUTDOWN, STEP, MOVE, TIMES = range(4)


def rows_payload(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """A step's rows as a STEP command: -> header [4], payload [3N + L + L*M]."""
    (n,), (n_lanes, width) = rows.tokens.shape, rows.block_table.shape
    payload = np.concatenate([rows.tokens, rows.positions, rows.lane, rows.last, rows.block_table.ravel()])
    return np.array([STEP, n, n_lanes, width], np.int64), payload


def payload_rows(header: np.ndarray, payload: np.ndarray, block_size: int) -> Rows:
    """The inverse of ``rows_payload``."""
    _, n, n_lanes, width = (int(h) for h in header)
    tokens, positions, lane, last, table = np.split(payload, np.cumsum([n, n, n, n_lanes]))
    return Rows(tokens, positions, lane, table.reshape(n_lanes, width), last, block_size)


def payload_shape(header: np.ndarray) -> tuple[int, ...]:
    op, a, b, c = (int(h) for h in header)
    return {STEP: (3 * a + b + b * c,), MOVE: (3, a)}.get(op, (0,))


def run_step(shard: Shard, comm: TPComm, bounds: np.ndarray, kv: KVShape, header: np.ndarray, payload: np.ndarray):
    """The step every rank runs for one command; -> [L, V] logits on rank 0, else None."""
    op = int(header[0])
    if op == STEP:
        return comm.gather_columns(shard.step(payload_rows(header, payload, kv.block_size)), bounds)  # [L, V]
    if op == MOVE:
        shard.move(*payload)
    elif op == TIMES:
        return comm.gather_seconds()  # [N]
    return None


def serve(shard: Shard, comm: TPComm, bounds: np.ndarray, kv: KVShape) -> None:
    """The loop of ranks 1 .. N-1: run rank 0's commands until SHUTDOWN."""
    header = np.empty(4, np.int64)
    while True:
        comm.wait_command(header)
        if header[0] == SHUTDOWN:
            return
        payload = comm.bcast(np.empty(payload_shape(header), np.int64))
        run_step(shard, comm, bounds, kv, header, payload)


class TPBackend(LaneBackend):
    """The Backend protocol on rank 0 of a tensor-parallel world of ``world`` ranks."""

    def __init__(self, config: GPTConfig, shard: Shard, comm: TPComm, kv: KVShape, bounds: np.ndarray) -> None:
        self.config = config
        self.kv = kv
        self.world = comm.world
        self.shard = shard
        self.comm = comm
        self.bounds = bounds  # [N + 1] logit columns of each rank
        self.closed = False
        self.broken = False  # an exception escaped mid-step: the other ranks may be inside a collective

    def _command(self, op: int, header: np.ndarray | None = None, payload: np.ndarray | None = None):
        if self.closed:
            raise RuntimeError("this tensor-parallel backend is closed")
        payload = np.zeros(0, np.int64) if payload is None else np.ascontiguousarray(payload, np.int64)
        header = np.array([op, payload.shape[-1], 0, 0], np.int64) if header is None else header
        try:
            self.comm.bcast(header)
            if op != SHUTDOWN:
                self.comm.bcast(payload)
            return run_step(self.shard, self.comm, self.bounds, self.kv, header, payload)
        except BaseException:
            self.broken = True
            raise

    def step(self, lanes: Sequence[Lane]) -> np.ndarray:
        header, payload = rows_payload(plan_rows(self.config, self.kv, lanes))
        return self._command(STEP, header, payload)  # [L, V]

    def move(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        src, dst, lengths = (np.asarray(a, np.int64) for a in (src, dst, lengths))
        self.check_move(src, dst, lengths)
        self._command(MOVE, payload=np.stack([src, dst, lengths]))  # [3, n]

    def comm_seconds(self) -> np.ndarray:
        """[N] seconds each rank has spent in the step's MPI calls so far (not waiting for commands)."""
        return self._command(TIMES)

    def close(self) -> None:
        """Send SHUTDOWN, so ranks 1 .. N-1 return from ``launch``; idempotent."""
        if self.closed:
            return
        if self.broken:  # the others may wait inside a collective that will never complete
            self.comm.comm.Abort(1)
        self._command(SHUTDOWN)
        self.closed = True
        self.shard = None  # free the weights and KV blocks; atexit keeps this object alive

    def __enter__(self) -> TPBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def install_abort_hook(comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Make an uncaught exception on this rank print its traceback, then end every rank of the job."""
    previous = sys.excepthook

    def abort(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        sys.stderr.flush()
        comm.Abort(1)

    if getattr(sys.excepthook, "__name__", "") != "abort":
        sys.excepthook = abort


def shard_factory(inner: str, rank: int):
    """The class that runs one rank's math: ``numpy`` (CPU) or ``numba`` (one GPU per rank)."""
    if inner == "numpy":
        return NumpyShard
    if inner != "numba":
        raise ValueError(f"unknown tensor-parallel inner backend {inner!r}; choose numpy or numba")
    try:
        from numba import cuda

        import numba_kernels
    except ImportError as error:
        raise ValueError(f"--tp with the numba backend needs numba_kernels and numba-cuda: {error}") from None
    numba_kernels.require_cuda()  # NoCudaError, naming what is missing
    cuda.select_device(rank % len(cuda.gpus))  # rank r uses GPU r mod the number of GPUs (the simulator has one)
    return numba_kernels.TPShard


def launch(
    config: GPTConfig,
    weights: GPT2Weights,
    n_slots: int | KVShape,
    inner: str = "numpy",
    vocab_parallel: bool = True,
    deterministic: bool = True,
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> TPBackend | None:
    """Shard the model over the ranks of ``comm``; on rank 0 return the backend.

    ``n_slots``: the KV memory, that many full-context slots or a ``KVShape``
    (paged blocks). Every rank calls this with the same config and weights.
    Ranks 1 .. N-1 keep only their shard, serve rank 0's commands until it
    calls ``close()`` (or exits), and return None.
    """
    tp = TPComm(comm, deterministic)
    configs = comm.allgather(config)  # once, at launch: every rank must build the same model
    if any(c != config for c in configs):
        raise ValueError(f"the {tp.world} ranks were given different models: {sorted(set(map(str, configs)))}")
    check_world(config, tp.world)  # the same on every rank: all raise, none waits
    kv = as_kv_shape(config, n_slots)
    shard_class = shard_factory(inner, tp.rank)
    if tp.world > 1:
        install_abort_hook(comm)
    shard = shard_class(config, shard_weights(config, weights, tp.rank, tp.world, vocab_parallel), kv, tp)
    full = np.array([0] + [config.vocab_size] * tp.world)  # replicated: rank 0 has every logit column
    bounds = vocab_bounds(config.vocab_size, tp.world) if vocab_parallel else full
    if tp.rank != 0:
        serve(shard, tp, bounds, kv)
        return None
    backend = TPBackend(config, shard, tp, kv, bounds)
    atexit.register(backend.close)  # a rank 0 that exits without close() must not leave the others waiting
    return backend
