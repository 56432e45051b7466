"""Errors that carry a message meant for the user (CLI prints it and exits non-zero)."""


class CncError(Exception):
    """A user-facing error: bad input, unknown name, unusable file."""


class ScenarioError(CncError):
    """A scenario file or name is wrong; the message names the file and the field."""
