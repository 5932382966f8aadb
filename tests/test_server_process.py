"""`flover serve` as a process: a stop signal mid-load exits 0 and loses no accepted request; --tp under mpiexec."""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flover.backends import make_backend
from flover.engine import Request
from flover.loadgen import replay
from flover.loading import resolve
from reference import SamplingParams, generate

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}  # a rank or a server per core


class ServerProcess:
    """``command`` started; ``url`` read from its first line (it prints where it serves once it does)."""

    def __init__(self, command: list[str], startup_s: float = 120.0) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            first = self.lines.get(timeout=startup_s)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no server within {startup_s} s: {self.proc.stderr.read()[-2000:]}") from None
        self.url = re.search(r"at (http://\S+);", first).group(1)

    def stop(self, sig: int, timeout_s: float = 60.0) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout_s)
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return rc, "".join(out), self.proc.stderr.read()


@functools.cache
def model_of(name: str | None):
    return resolve(name)


def serial_tokens(model: str | None, request: Request) -> list[int]:
    config, weights, _ = model_of(model)
    return [int(t) for t in generate(make_backend("numpy", config, weights, 1), request.prompt_ids,
                                     request.max_new_tokens, request.sampling)]  # fmt: skip


def running(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^flover_requests_running (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_mid_load_exits_0_and_finishes_every_accepted_request(sig):
    server = ServerProcess([sys.executable, "-m", "flover.cli", "serve", "--port", "0", "--slots", "4"])
    trace = [Request(i, 0.0, (40 + i, 32), 200, SamplingParams(seed=i)) for i in range(8)]
    results: list = []
    clients = threading.Thread(target=lambda: results.extend(asyncio.run(replay(server.url, trace))))
    clients.start()
    while running(server.url) < 4:  # four streams run, four wait: all accepted, none finished
        time.sleep(0.01)
    rc, out, err = server.stop(sig)
    clients.join(60)
    assert rc == 0 and "flover: stopped" in out and "Traceback" not in err, err[-2000:]
    assert [(r.error, len(r.tokens), r.finish_reason) for r in results] == [(None, 200, "length")] * 8
    assert results[0].tokens == serial_tokens(None, trace[0])


def test_a_busy_port_is_one_line_and_exit_2(capsys):
    from flover.cli import main
    from flover.server.run import listen

    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        taken.listen()
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.skipif(MPIEXEC is None or not shutil.which("hydra_pmi_proxy", path=str(Path(sys.executable).parent)),
                    reason="no mpiexec (pip install mpich)")  # fmt: skip
def test_tensor_parallel_serve_answers_from_rank_0_and_stops_on_sigterm():
    pytest.importorskip("mpi4py")
    server = ServerProcess([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "flover.cli", "serve", "--tp",
                            "--model", "tiny", "--port", "0", "--slots", "4"])  # fmt: skip
    trace = [Request(i, 0.0, (1 + i, 2, 3), 12) for i in range(4)]
    results = asyncio.run(replay(server.url, trace))
    rc, out, err = server.stop(signal.SIGTERM)
    assert rc == 0 and out.count("flover: stopped") == 1, err[-2000:]
    for request, result in zip(trace, results):
        assert result.tokens == serial_tokens("tiny", request), "TP greedy tokens equal one process's on tiny"
