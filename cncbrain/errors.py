"""Errors that carry a message meant for the user (CLI prints it and exits non-zero)."""


class CncError(Exception):
    """A user-facing error: the CLI prints it and exits 1 (a service, 1 too)."""


class UsageError(CncError):
    """The command line (or a setting) is wrong: a bad flag value, an unknown name, a bad input file.
    The CLI prints it and exits 2, as argparse does for a malformed command line."""


class ScenarioError(UsageError):
    """A scenario file or name is wrong; the message names the file and the field."""
