"""``flover demo``: the four policies on a short trace of the default model, in under a minute."""

from __future__ import annotations

from flover.cli import build_parser


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run every policy on a short trace of the shipped model and plot it")
    p.add_argument("--out", default="out/demo", help="where the plots and JSON go")
    p.set_defaults(run=run)


def run(args) -> int:
    argv = ["bench", "--policy", "all", "--requests", "24", "--rate", "40", "--prompt-len", "8:24",
            "--output-len", "16:64", "--slots", "8", "--max-batch", "8", "--window-ms", "50", "--instances", "2",
            "--json", f"{args.out}/runs.json", "--plot", args.out]  # fmt: skip
    print("flover demo: " + " ".join(["flover", *argv]))
    bench = build_parser().parse_args(argv)
    return bench.run(bench)
