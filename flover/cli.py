"""The ``flover`` command. Errors a user can cause print one line on stderr and exit 2."""

from __future__ import annotations

import sys

from flover.commands import bench, calibrate, demo, generate, serve, simulate, sweep, trace
from flover.commands.parser import Parser, UsageError
from reference import CheckpointError

COMMANDS = (generate, trace, bench, sweep, simulate, calibrate, serve, demo)


def build_parser() -> Parser:
    parser = Parser(prog="flover", description="Temporal fusion for autoregressive inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
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
