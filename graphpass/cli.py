"""The ``graphpass`` command line. Each subcommand lives in ``graphpass/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) so this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules under graphpass.commands, in help order.
COMMANDS = ["demo", "inspect", "export", "analyze", "search", "bench", "calibrate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphpass", description="Compile video DiTs into per-phase "
                                     "cache-or-compute graphs (PAB, AdaCache) for faster sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"graphpass.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import GraphpassError

    try:
        return int(args.func(args) or 0)
    except GraphpassError as e:
        print(f"graphpass {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
