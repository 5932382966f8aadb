"""``flover demo``: the policies on a short trace of the default model, in under a minute."""

from __future__ import annotations

from flover.commands import bench, generate
from flover.commands.parser import parse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run every policy on a short trace of the shipped model and plot it")
    p.add_argument("--out", default="out/demo", help="where the plots and JSON go")
    p.set_defaults(run=run)


def run(args) -> int:
    sample = ["generate", "--prompt", "def ", "--max-new-tokens", "120"]
    print("flover demo: " + " ".join(["flover", *sample]))
    generate.run(parse(generate, sample))
    # a burst of 48 requests: enough load that the policies differ on a small model
    argv = ["bench", "--policy", "all", "--requests", "48", "--rate", "400", "--prompt-len", "8:24",
            "--output-len", "16:128", "--slots", "16", "--max-batch", "16", "--queue-delay-ms", "20",
            "--instances", "2", "--json", f"{args.out}/runs.json", "--plot", args.out]  # fmt: skip
    print("\nflover demo: " + " ".join(["flover", *argv]))
    return bench.run(parse(bench, argv))
