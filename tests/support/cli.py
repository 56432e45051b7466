"""Running `cncbrain` commands as a user does: subprocesses."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "cncbrain.cli"]


def command(name):
    """One command's module as its own entry point: same register/func as `cncbrain NAME`, without
    importing the training commands (torch) on every call."""
    return [sys.executable, "-m", f"cncbrain.commands.{name}"]


def cli(name, *args, env, timeout=60, full=False):
    argv = [*CLI, name, *args] if full else [*command(name), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
