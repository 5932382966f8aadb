"""A server on a thread of this process, on a free loopback port: for tests, notebooks and benchmarks.

    with serve_in_thread(policy=PolicyConfig("fused", slots=8)) as server:
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "def ", "max_tokens": 8})
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flover.backends import make_backend
from flover.loading import default_model, resolve
from flover.runner import PolicyConfig, warm_up
from flover.server.run import GracefulServer, listen, make_server, url_of


@contextmanager
def serve_in_thread(model: str | None = None, policy: PolicyConfig = PolicyConfig(), max_waiting: int | None = 256,
                    backend: str = "numpy", weights_seed: int = 0, tokenizer=None,
                    startup_timeout_s: float = 30.0) -> Iterator[GracefulServer]:  # fmt: skip
    """Yield the running server (``.url``, ``.service``); stop it gracefully on the way out."""
    model = model or default_model()
    config, weights, default_tokenizer = resolve(model, weights_seed)
    engine_backend = make_backend(backend, config, weights, policy.layout(config).shape)
    warm_up(engine_backend)
    server = make_server(engine_backend, tokenizer or default_tokenizer, model, policy, max_waiting)
    sock = listen("127.0.0.1", 0)
    server.url = url_of(sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="flover-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError(f"the server did not start within {startup_timeout_s} s")
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
