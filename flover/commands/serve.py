"""``flover serve``: the fused engine behind an OpenAI-compatible HTTP server.

    flover serve                                  # the shipped model on http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0}'
    mpiexec -n 2 flover serve --tp --model gpt2   # tensor parallel: rank 0 serves, the others mirror its steps

SIGINT or SIGTERM stops it gracefully: it accepts nothing new, answers what
it has accepted (within --shutdown-timeout, then cancels the rest) and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys

from flover.commands.common import add_model_flags, add_policy_flags, check_run_memory, policy_config

SERVED_POLICIES = ("fused", "dynamic", "serial")  # the ones that run on the one engine loop


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP with OpenAI's completions API")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    p.add_argument("--policy", choices=SERVED_POLICIES, default="fused")
    add_policy_flags(p)
    p.add_argument("--max-waiting", type=int, default=256,
                   help="accepted requests not yet in KV memory (a burst waits there for the next iteration); "
                        "one more gets HTTP 429 at once")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds a stop waits for accepted requests before it cancels them")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(run=run)


def run(args) -> int:
    from flover.launch import open_backend
    from flover.loading import default_model, resolve
    from flover.server.run import listen

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting < 1:  # every request waits until the next iteration: 0 would refuse them all
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 s, got {args.shutdown_timeout}")
    model = args.model or default_model()
    config, weights, tokenizer = resolve(model, args.weights_seed)
    pc = policy_config(args, args.policy)
    layout = pc.layout(config)
    check_run_memory(config, [pc], [layout.shape])
    if args.tp:
        workers_ignore_signals()
    with open_backend(args.backend, config, weights, layout.shape, tp=args.tp) as backend:
        if backend is None:  # a worker rank of a tensor-parallel job: it mirrored rank 0's steps until the end
            return 0
        listener = listen(args.host, args.port)
        return serve(args, model, tokenizer, backend, pc, listener)


def serve(args, model: str, tokenizer, backend, pc, listener) -> int:
    from flover.runner import warm_up
    from flover.server.run import make_server, url_of
    from flover.server.service import served_name

    warm_up(backend)
    logging.basicConfig(format="flover: %(levelname)s: %(message)s", level=args.log_level.upper())
    ready = (f"flover: serving {served_name(model)} ({pc.label}, at most {args.max_waiting} waiting) at {url_of(listener)}; "
             "Ctrl-C stops")  # fmt: skip
    server = make_server(backend, tokenizer, model, pc, args.max_waiting, args.shutdown_timeout, args.log_level,
                         args.access_log, ready)  # fmt: skip
    server.run(sockets=[listener])
    if server.service.live.error is not None:
        print(f"flover: error: the engine failed: {server.service.live.error!r}", file=sys.stderr)
        return 1
    print("flover: stopped", flush=True)
    return 0


def workers_ignore_signals() -> None:
    """Under --tp a worker rank ends when rank 0 closes the backend, not on a signal: mpiexec passes
    SIGINT/SIGTERM to every rank, and a worker that died first would leave rank 0 unable to finish."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() != 0:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
