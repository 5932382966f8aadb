"""Busy neighbours for calibration: processes that each step a one-thread model of their own.

Concurrent instances run in processes, one per share of the cores, each
with its own copy of the weights (``flover.engine.instances``). So a step
timed "as an instance runs" is timed beside processes like them: each loads
its own weights (no cache lines shared with the step being timed) and steps
a batch-1 decode on one thread until it is stopped. Threads in the timing
process would share its weights and its interpreter lock, and on this
project's 2-core machine a step beside one was 15-20% faster than beside a
process.

    with NeighbourProcesses(config, n=1):
        ...time one-thread steps...

``python -m flover.sim.neighbour`` is one neighbour: it reads its model's
config from stdin (pickled), says "ready" once it steps, and steps until it
is terminated.
"""

from __future__ import annotations

import pickle
import subprocess
import sys


class NeighbourProcesses:
    """``n`` neighbour processes, started on entry (once each is stepping) and stopped on exit."""

    def __init__(self, config, n: int) -> None:
        self.config, self.n = config, n
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> NeighbourProcesses:
        try:
            for seed in range(1, self.n + 1):  # seeds other than the timed model's 0: weights of their own
                p = subprocess.Popen([sys.executable, "-m", "flover.sim.neighbour"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
                self.processes.append(p)
                p.stdin.write(pickle.dumps((self.config, seed)))
                p.stdin.close()
            for p in self.processes:
                if p.stdout.readline().strip() != b"ready":
                    p.wait()
                    raise RuntimeError(f"a calibration neighbour failed to start:\n{p.stderr.read().decode()}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            p.wait()
            p.stdout.close()
            p.stderr.close()
        self.processes.clear()


def main() -> None:
    config, seed = pickle.load(sys.stdin.buffer)
    import numba

    from reference import Lane, NumpyBackend, init_weights

    numba.set_num_threads(1)
    backend = NumpyBackend(config, init_weights(config, seed=seed), 1, threads=1)
    lane = Lane.of([0], [1], min(64, config.n_ctx - 1))  # a serial instance's step: one token over 64 positions
    backend.step([lane])  # compiled and paged in
    print("ready", flush=True)
    while True:
        backend.step([lane])


if __name__ == "__main__":
    main()
