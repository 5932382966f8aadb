"""The argument parser every subcommand uses: a bad flag is one line, never a usage dump."""

from __future__ import annotations

import argparse


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


def parse(module, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the subcommand that ``module`` defines, as ``flover`` would parse it."""
    sub = Parser(prog="flover").add_subparsers(dest="command", required=True, parser_class=Parser)
    module.add_parser(sub)
    return sub._name_parser_map[argv[0]].parse_args(argv[1:])
