"""``flover trace``: write a Poisson (or gamma) workload as JSON Lines."""

from __future__ import annotations

import sys

from flover.commands.common import add_trace_flags, make_trace
from flover.trace import write_trace
from reference import preset


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="write a workload of timed requests as JSON Lines to stdout")
    add_trace_flags(p)
    p.add_argument("--vocab-size", type=int, default=preset("tiny").vocab_size, help="prompt ids are drawn below this")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.vocab_size < 1:
        raise ValueError(f"vocab-size must be >= 1, got {args.vocab_size}")
    config = type("Vocab", (), {"vocab_size": args.vocab_size})
    write_trace(make_trace(args, config), sys.stdout)
    return 0
