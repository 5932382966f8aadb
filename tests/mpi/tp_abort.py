"""A rank that raises must end the whole job: ``mpiexec -n N python tests/mpi/tp_abort.py --rank R --where W``.

``--where step``: rank R's shard raises inside its third step, while the
other ranks wait in a reduction. ``--where engine``: rank 0 raises in its own
code between two steps, while the other ranks wait for the next command.
Either way the job must end with a non-zero status; the test times it.
``--where exit``: rank 0 leaves with ``sys.exit(2)`` (as the CLI does on a bad
flag) without closing the backend; the others must still leave, with status 2.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

from mpi_tp import NumpyShard, launch
from reference import init_weights, preset


class InjectedFault(RuntimeError):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--where", choices=["step", "engine", "exit"], required=True)
    args = parser.parse_args()
    rank = MPI.COMM_WORLD.Get_rank()
    if args.where == "step" and rank == args.rank:
        step, calls = NumpyShard.step, []

        def failing_step(self, rows):
            calls.append(1)
            if len(calls) == 3:
                raise InjectedFault(f"rank {rank} fails inside step 3")
            return step(self, rows)

        NumpyShard.step = failing_step
    config = preset("tiny")
    backend = launch(config, init_weights(config), n_slots=2)
    if backend is None:
        return
    backend.prefill(0, np.arange(4))
    for i in range(10):
        if args.where == "engine" and i == 3:
            raise InjectedFault("rank 0 fails between two decode steps")
        if args.where == "exit" and i == 3:
            sys.exit(2)
        backend.decode(np.array([0]), np.array([1]), np.array([4 + i]))
    backend.close()
    print("no fault was raised", flush=True)


if __name__ == "__main__":
    main()
