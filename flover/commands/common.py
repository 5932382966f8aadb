"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse

from flover.backends import BACKENDS


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a preset (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a checkpoint "
                        "directory; default: the small trained model shipped with flover")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--backend", choices=BACKENDS, default="numpy",
                   help="numpy (batch invariant, default), numpy-blas, or numba (CUDA)")
    p.add_argument("--tp", action="store_true",
                   help="tensor parallel over the MPI ranks of this job (run under mpiexec)")  # fmt: skip


def add_trace_flags(p: argparse.ArgumentParser, with_rate: bool = True) -> None:
    if with_rate:
        p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    p.add_argument("--requests", type=int, default=32, help="number of requests")
    p.add_argument("--prompt-len", default="8:32", help="prompt length range A:B (inclusive)")
    p.add_argument("--output-len", default="16:64", help="output length range A:B (inclusive)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 is Poisson")


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots", type=int, default=16, help="fused: KV slots (most requests in one step)")
    p.add_argument("--no-shuffle", action="store_true", help="fused: keep holes and compute over them")
    p.add_argument("--max-batch", type=int, default=16, help="dynamic: largest batch")
    p.add_argument("--window-ms", type=float, default=50.0, help="dynamic: batching window after the first arrival")
    p.add_argument("--instances", type=int, default=2, help="instances: concurrent model instances")


def policy_config(args, policy: str):
    from flover.runner import PolicyConfig

    return PolicyConfig(policy, slots=args.slots, shuffle=not args.no_shuffle, max_batch=args.max_batch,
                        window_s=args.window_ms / 1e3, instances=args.instances)  # fmt: skip


def make_trace(args, config, rate: float | None = None):
    from flover.trace import parse_range, poisson_trace

    return poisson_trace(rate if rate is not None else args.rate, args.requests,
                         parse_range(args.prompt_len, "--prompt-len"), parse_range(args.output_len, "--output-len"),
                         seed=args.seed, burstiness=args.burstiness, vocab_size=config.vocab_size)  # fmt: skip
