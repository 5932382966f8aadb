"""Running the app: a listening socket, and uvicorn's server with a graceful stop that exits 0."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import uvicorn

from flover import __version__
from flover.clock import WallClock
from flover.engine import Engine, LiveEngine
from flover.runner import PolicyConfig
from flover.server.app import create_app
from flover.server.service import CompletionService
from reference.backend import Backend


def listen(host: str, port: int) -> socket.socket:
    """A bound socket: a busy port is one clear error, and the port that 0 chose is known before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class GracefulServer(uvicorn.Server):
    """uvicorn's server with two changes: a stop signal first closes the door (new requests get 503 while
    the accepted ones finish), and a graceful stop exits 0 (uvicorn would re-raise the signal and die by it)."""

    def __init__(self, config: uvicorn.Config, service: CompletionService, ready_line: str) -> None:
        super().__init__(config)
        self.service, self.ready_line = service, ready_line

    def handle_exit(self, sig: int, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # a test's server thread: no signals
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.ready_line:
            print(self.ready_line, flush=True)


def make_server(backend: Backend, tokenizer, model: str, policy: PolicyConfig, max_waiting: int | None,
                shutdown_timeout_s: float = 30.0, log_level: str = "warning", access_log: bool = False,
                ready_line: str = "") -> GracefulServer:  # fmt: skip
    """The engine on ``backend`` (warm it first) behind the app, ready to ``run(sockets=[listen(...)])``."""
    layout = policy.layout(backend.config)
    live = LiveEngine(Engine(backend, policy.scheduler(), layout, WallClock()), max_waiting=max_waiting)
    service = CompletionService(live, tokenizer, model, policy.label)
    config = uvicorn.Config(create_app(service, shutdown_timeout_s, __version__), log_level=log_level,
                            access_log=access_log, lifespan="on", timeout_graceful_shutdown=shutdown_timeout_s)  # fmt: skip
    return GracefulServer(config, service, ready_line)
