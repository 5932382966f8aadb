"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flover.backends import BACKENDS
from flover.budget import check_memory
from reference import GPTConfig, KVShape

if TYPE_CHECKING:
    from flover.runner import PolicyConfig


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
    p.add_argument("--no-shuffle", action="store_true", help="fused, slots: keep holes and compute over them")
    p.add_argument("--kv", choices=("slots", "paged"), default="slots",
                   help="fused: KV layout, Flover's slots or vLLM-style paged blocks")
    p.add_argument("--block-size", type=int, default=16, help="paged: positions per KV block")
    p.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                   help="fused: KV memory budget in GiB (default: what --slots full-context slots need)")
    p.add_argument("--prefill", choices=("alone", "chunked"), default="alone",
                   help="fused: each prompt in a step of its own, or in chunks beside the decodes")
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunked: the most tokens in one step")
    p.add_argument("--max-batch", type=int, default=16, help="dynamic: largest batch")
    p.add_argument("--queue-delay-ms", type=float, default=50.0,
                   help="dynamic: how long a batch waits for more requests after its first arrival")
    p.add_argument("--instances", type=int, default=2, help="instances: concurrent model instances (processes)")


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    """What ``flover bench`` and ``flover simulate`` serve and where they report it: the policy and its
    settings, the trace, the JSON, the plots and the progress bar."""
    from flover.runner import POLICIES

    p.add_argument("--policy", default="fused", help=f"{', '.join(POLICIES)}, or all")
    add_policy_flags(p)
    p.add_argument("--trace", help="a JSON Lines trace (else one is generated from the trace flags)")
    add_trace_flags(p)
    p.add_argument("--json", dest="json_out", help="write the runs as JSON to this file")
    p.add_argument("--plot", help="write timeline and latency PNGs into this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def policy_config(args, policy: str, **changes):
    from flover.runner import PolicyConfig

    settings = dict(slots=args.slots, shuffle=not args.no_shuffle, kv=args.kv, block_size=args.block_size,
                    kv_memory_gib=args.kv_memory, prefill=args.prefill, chunk_tokens=args.chunk_tokens,
                    max_batch=args.max_batch, queue_delay_s=args.queue_delay_ms / 1e3, instances=args.instances)
    return PolicyConfig(policy, **{**settings, **changes})  # fmt: skip


def policies_of(args) -> list[PolicyConfig]:
    """``--policy``: one policy, or all: fused as configured (and without the shuffle too), then the baselines."""
    from flover.runner import POLICIES

    if args.policy != "all":
        return [policy_config(args, args.policy)]
    configs = [policy_config(args, "fused")]
    if args.kv == "slots" and not args.no_shuffle:
        configs.append(policy_config(args, "fused", shuffle=False))
    return configs + [policy_config(args, name) for name in POLICIES[1:]]


def make_trace(args, config, rate: float | None = None):
    from flover.trace import parse_range, poisson_trace

    return poisson_trace(rate if rate is not None else args.rate, args.requests,
                         parse_range(args.prompt_len, "--prompt-len"), parse_range(args.output_len, "--output-len"),
                         seed=args.seed, burstiness=args.burstiness, vocab_size=config.vocab_size)  # fmt: skip


def shared_kv(config: GPTConfig, configs: list) -> list[KVShape]:
    """The KV memory the run's backends need: one per block size, as large as its largest user."""
    shapes: dict[int, KVShape] = {}
    for pc in configs:
        if pc.policy != "instances":
            shape = pc.layout(config).shape
            if shape.n_blocks > shapes.get(shape.block_size, KVShape(1, 1)).n_blocks:
                shapes[shape.block_size] = shape
    return list(shapes.values())


def check_run_memory(config: GPTConfig, configs: list, shapes: list[KVShape]) -> None:
    instances = max((pc.instances for pc in configs if pc.policy == "instances"), default=0)
    slot = KVShape.slots(config, 1).nbytes(config)
    check_memory(config, sum(s.nbytes(config) for s in shapes), instances, slot)
