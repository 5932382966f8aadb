"""The tensor-parallel Backend: rank 0 serves the engine, every other rank mirrors each call.

Rank 0 holds a ``TPBackend`` (the Backend protocol of ``reference.backend``).
Each call broadcasts a command, a header int64 [3] = (op, n, slot) and then an
int64 payload whose shape the header fixes, and runs the same step as the
other ranks, which loop in ``serve``: wait for a command, run it on their
shard, wait again. Logits come back to rank 0 only.

    op        payload              the step on every rank
    PREFILL   [T] tokens           shard.prefill, then gather the logit columns
    DECODE    [3, B] slots,        shard.decode, then gather the logit columns
              tokens, positions
    MOVE      [3, n] src, dst,     shard.move_slots (each rank moves its own heads)
              lengths
    TIMES     none                 gather each rank's communication seconds
    SHUTDOWN  none                 leave the loop

Rank 0 checks every argument a user can get wrong before it broadcasts, so a
bad request raises ValueError on rank 0 and the other ranks never see it. An
exception inside a step is different: the ranks are then out of step, so the
job must end; ``install_abort_hook`` makes any uncaught exception on any rank
call ``MPI.COMM_WORLD.Abort(1)`` (as ``python -m mpi4py`` does).
"""

from __future__ import annotations

import atexit
import sys

import numpy as np
from mpi4py import MPI

from mpi_tp.comm import TPComm
from mpi_tp.model import NumpyShard, Shard
from mpi_tp.shard import check_world, shard_weights, vocab_bounds
from reference import GPT2Weights, GPTConfig
from reference.kv import check_move

SHUTDOWN, PREFILL, DECODE, MOVE, TIMES = range(5)


def payload_shape(op: int, n: int) -> tuple[int, ...]:
    return {PREFILL: (n,), DECODE: (3, n), MOVE: (3, n)}.get(op, (0,))


def run_step(shard: Shard, comm: TPComm, bounds: np.ndarray, header: np.ndarray, payload: np.ndarray):
    """The step every rank runs for one command; -> [n, V] logits on rank 0, else None."""
    op, _, slot = (int(h) for h in header)
    if op == PREFILL:
        return comm.gather_columns(shard.prefill(slot, payload)[None], bounds)  # [1, V]
    if op == DECODE:
        return comm.gather_columns(shard.decode(*payload), bounds)  # [B, V]
    if op == MOVE:
        shard.move_slots(*payload)
    elif op == TIMES:
        return comm.gather_seconds()  # [N, 2]
    return None


def serve(shard: Shard, comm: TPComm, bounds: np.ndarray) -> None:
    """The loop of ranks 1 .. N-1: run rank 0's commands until SHUTDOWN."""
    header = np.empty(3, np.int64)
    while True:
        comm.wait_command(header)
        if header[0] == SHUTDOWN:
            return
        payload = comm.bcast(np.empty(payload_shape(int(header[0]), int(header[1])), np.int64))
        run_step(shard, comm, bounds, header, payload)


class TPBackend:
    """The Backend protocol on rank 0 of a tensor-parallel world of ``world`` ranks."""

    def __init__(self, config: GPTConfig, shard: Shard, comm: TPComm, n_slots: int, bounds: np.ndarray) -> None:
        self.config = config
        self.n_slots = n_slots
        self.world = comm.world
        self.shard = shard
        self.comm = comm
        self.bounds = bounds  # [N + 1] logit columns of each rank
        self.closed = False
        self.broken = False  # an exception escaped mid-step: the other ranks may be inside a collective

    def _command(self, op: int, slot: int = 0, payload: np.ndarray | None = None):
        if self.closed:
            raise RuntimeError("this tensor-parallel backend is closed")
        payload = np.zeros(0, np.int64) if payload is None else np.ascontiguousarray(payload, np.int64)
        header = np.array([op, payload.shape[-1], slot], np.int64)
        try:
            self.comm.bcast(header)
            if op != SHUTDOWN:
                self.comm.bcast(payload)
            return run_step(self.shard, self.comm, self.bounds, header, payload)
        except BaseException:
            self.broken = True
            raise

    def prefill(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        self._check_slots(np.array([slot]))
        if not 1 <= len(tokens) <= self.config.n_ctx:
            raise ValueError(f"a prompt needs 1 to n_ctx {self.config.n_ctx} tokens, got {len(tokens)}")
        self._check_tokens(tokens)
        return self._command(PREFILL, int(slot), tokens)[0]  # [V]

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        step = np.stack([np.asarray(a, np.int64).reshape(-1) for a in (slots, tokens, positions)])  # [3, B]
        if step.shape[1] == 0:
            return np.zeros((0, self.config.vocab_size), np.float32)
        self._check_slots(step[0])
        if len(set(step[0].tolist())) != step.shape[1]:
            raise ValueError(f"a decode step takes each slot once, got slots {step[0].tolist()}")
        self._check_tokens(step[1])
        if step.shape[1] and not (0 <= step[2].min() and step[2].max() < self.config.n_ctx):
            raise ValueError(f"decode positions must lie in 0..{self.config.n_ctx - 1}, got {step[2].tolist()}")
        return self._command(DECODE, payload=step)  # [B, V]

    def move_slots(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> None:
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        check_move(src, dst, self.n_slots)
        lengths = np.broadcast_to(np.asarray(lengths, np.int64), src.shape)
        self._command(MOVE, payload=np.stack([src, dst, lengths]))  # [3, n]

    def comm_seconds(self) -> np.ndarray:
        """[N] seconds each rank has spent in the step's MPI calls so far (not waiting for commands)."""
        return self._command(TIMES)[:, 0]

    def idle_seconds(self) -> np.ndarray:
        """[N] seconds each rank has waited for rank 0's next command (rank 0: always 0)."""
        return self._command(TIMES)[:, 1]

    def close(self) -> None:
        """Send SHUTDOWN, so ranks 1 .. N-1 return from ``launch``; idempotent."""
        if self.closed:
            return
        if self.broken:  # the others may wait inside a collective that will never complete
            self.comm.comm.Abort(1)
        self._command(SHUTDOWN)
        self.closed = True
        self.shard = None  # free the weights and KV slots; atexit keeps this object alive

    def __enter__(self) -> TPBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_slots(self, slots: np.ndarray) -> None:
        if slots.size and (slots.min() < 0 or slots.max() >= self.n_slots):
            raise ValueError(f"slot out of range 0..{self.n_slots - 1}: {slots.tolist()}")

    def _check_tokens(self, tokens: np.ndarray) -> None:
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary 0..{self.config.vocab_size - 1}")


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
    if not hasattr(numba_kernels, "TPShard"):
        raise ValueError("numba_kernels has no TPShard (the tensor-parallel shard of mpi_tp.model.Shard) yet; use inner='numpy'")
    cuda.select_device(rank % len(cuda.gpus))  # rank r uses GPU r mod the number of GPUs
    return numba_kernels.TPShard


def launch(
    config: GPTConfig,
    weights: GPT2Weights,
    n_slots: int,
    inner: str = "numpy",
    vocab_parallel: bool = True,
    deterministic: bool = True,
    comm: MPI.Comm = MPI.COMM_WORLD,
) -> TPBackend | None:
    """Shard the model over the ranks of ``comm``; on rank 0 return the backend.

    Every rank calls this with the same config and weights. Ranks 1 .. N-1 keep
    only their shard, serve rank 0's commands until it calls ``close()`` (or
    exits), and return None.
    """
    tp = TPComm(comm, deterministic)
    configs = comm.allgather(config)  # once, at launch: every rank must build the same model
    if any(c != config for c in configs):
        raise ValueError(f"the {tp.world} ranks were given different models: {sorted(set(map(str, configs)))}")
    check_world(config, tp.world)  # the same on every rank: all raise, none waits
    shard_class = shard_factory(inner, tp.rank)
    if tp.world > 1:
        install_abort_hook(comm)
    shard = shard_class(config, shard_weights(config, weights, tp.rank, tp.world, vocab_parallel), n_slots, tp)
    full = np.array([0] + [config.vocab_size] * tp.world)  # replicated: rank 0 has every logit column
    bounds = vocab_bounds(config.vocab_size, tp.world) if vocab_parallel else full
    if tp.rank != 0:
        serve(shard, tp, bounds)
        return None
    backend = TPBackend(config, shard, tp, n_slots, bounds)
    atexit.register(backend.close)  # a rank 0 that exits without close() must not leave the others waiting
    return backend
