"""The `cncbrain` command line.

Each subcommand lives in its own module under `cncbrain.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func` (a callable taking the parsed
args and returning an exit code). Add a module name to COMMANDS to add a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cncbrain import __version__

COMMANDS = [
    "scenarios",
    "eval",
    "bench",
    "up",
    "demo",
    "agent",
    "emulate",
    "sites",
    "status",
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
    "credentials",
    "provision",
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with just `only` (so that running one command does not
    import the others' dependencies, e.g. torch for `train`)."""
    parser = argparse.ArgumentParser(prog="cncbrain", description="CNC Brain control plane")
    parser.add_argument("--version", action="version", version=f"cncbrain {__version__}")
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
    from cncbrain.commands._live import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
