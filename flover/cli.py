"""The ``flover`` command. Errors a user can cause print one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

from reference import CheckpointError


class UsageError(ValueError):
    """A bad flag or value, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(f"{self.prog}: {message}")


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> Parser:
    from flover.commands import bench, demo, generate, sweep, trace

    parser = Parser(prog="flover", description="Temporal fusion for autoregressive inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (generate, trace, bench, sweep, demo):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args) or 0
    except (UsageError, CheckpointError, ValueError) as error:
        print(f"flover: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("flover: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
