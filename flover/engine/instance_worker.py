"""One model instance in a process of its own: ``python -m flover.engine.instance_worker FD``.

It receives its backend factory over the pipe FD, builds its own weights,
warms up, says ready, then serves each request the router sends, serially,
until it receives None. See ``flover.engine.instances.InstanceProcesses``.
"""

from __future__ import annotations

import sys
import traceback
from multiprocessing.connection import Connection

from flover.clock import WallClock
from flover.engine.instances import serial_engine


def main(fd: int) -> None:
    """One instance process: receive its model, build its own backend, say ready, then serve until None."""
    conn = Connection(fd)
    try:
        make_backend, threads, keep_logits = conn.recv()
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        backend = make_backend(1)
        backend.threads = threads
        from flover.runner import warm_up

        warm_up(backend)
        conn.send(("ready", None))
        while (message := conn.recv()) is not None:
            request, start = message
            engine = serial_engine(backend, WallClock(start), keep_logits)
            (result,) = engine.run([request])
            conn.send(("done", (result, engine.stats.steps)))
    except BaseException:  # reported to the router, which raises it
        conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":
    main(int(sys.argv[1]))
