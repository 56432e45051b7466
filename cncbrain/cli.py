"""The `cncbrain` command line.

Each subcommand lives in its own module under `cncbrain.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func` (a callable taking the parsed
args and returning an exit code). Add a module name to COMMANDS to add a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cncbrain.errors import CncError

COMMANDS = [
    "scenarios",
    "eval",
    "bench",
    "up",
    "demo",
    "agent",
    "emulate",
    "sites",
    "deploy",
    "submit",
    "workloads",
    "cancel",
    "watch",
    "train",
    # governance and adaptation
    "tenants",
    "quota",
    "policy",
    "tokens",
    "usage",
    "ledger",
    "actions",
    "plan",
    "certs",
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with just `only` (so that running one command does not
    import the others' dependencies, e.g. torch for `train`)."""
    parser = argparse.ArgumentParser(prog="cncbrain", description="CNC Brain control plane")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only else COMMANDS:
        try:
            module = importlib.import_module(f"cncbrain.commands.{name}")
        except ModuleNotFoundError as exc:  # an optional extra (e.g. torch) is missing
            if exc.name and exc.name.startswith("cncbrain"):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit code; a user error is printed and exits 2, Ctrl-C 130."""
    try:
        return int(args.func(args) or 0)
    except CncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
