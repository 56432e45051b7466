"""Hard limits on what a client may send, in one place: the bounds of every number and string of
the tenant and operator APIs, the checks that enforce them, and how an error quotes the input.

The services check requests with these (`services/scheduler/domain.py` for workload specs,
`services/governance` for tenants, quotas and policies, `services/adaptation` for autoscaling
policies) and answer INVALID_ARGUMENT naming the field; the CLI checks its options with
`arg_int`/`arg_float` before it sends anything, so a range error is a usage message, not a traceback.
Nothing past these checks allocates in proportion to a number a client chose: every count is
bounded here, and the emulator models a high request rate by weighting sampled requests
(`cncbrain.twin`). The bounds are listed in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from cncbrain.errors import InvalidArgument

QUOTE_CHARS = 100
"""An error message quotes at most this many characters of a client's input."""

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Names and ids that travel in NATS subjects: workload and site ids, request ids, service names."""
MAX_TEXT = 256
"""Free text (a model name, a description) in characters."""
MAX_LIST = 32
"""Entries of a list a client sends (allowed GPU types, sites, regions)."""

MAX_PARAMS_B = 10_000.0
"""Model size, billions of parameters."""
MAX_RATE_RPS = 10_000.0
"""Expected request rate of one inference service, requests/s."""
MAX_TTFT_MS = 600_000.0
"""Time-to-first-token SLO: at most 10 minutes."""
MAX_TPOT_MS = 60_000.0
"""Time-per-output-token SLO: at most 1 minute."""
MAX_TOKENS = 1e15
"""Training tokens of one job."""
MAX_GANG_TIMEOUT_S = 86_400.0
"""How long a training job may wait to be gang-placed: at most a day."""
MAX_UNITS = 4096
"""Replicas of a service or shards of a job."""
MAX_GPUS_PER_UNIT = 64
"""GPUs of one replica or one shard."""
MAX_GPUS = 1_000_000
"""GPUs in a quota."""
MAX_COST_PER_HOUR = 1e9
"""USD per hour in a quota or policy."""


class LimitError(InvalidArgument):
    """A request field is out of its bounds; `field` names it (the message starts with it)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters with the full length said, for error messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else f"{len(text)} characters as text"
    return f"{text[:limit]}… ({size})"


def number(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False, unit: str = "") -> float:
    """`value` finite and within [lo, hi] (or (lo, hi] with `lo_open`)."""
    if not math.isfinite(value):
        raise LimitError(field, f"{value} is not a finite number")
    if value > hi or (value <= lo if lo_open else value < lo):
        raise LimitError(field, f"{value:g} is not in {'(' if lo_open else '['}{lo:g}, {hi:g}]{unit}")
    return value


def integer(field: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise LimitError(field, f"{quote(value)} is not in {lo}..{hi}")
    return value


def name(field: str, value: str) -> str:
    """A subject-safe name: 1..64 characters of [A-Za-z0-9_-]."""
    if not NAME.match(value or ""):
        raise LimitError(field, f"{quote(value)} must be 1..64 characters of [A-Za-z0-9_-]")
    return value


def text(field: str, value: str, *, required: bool = True, max_len: int = MAX_TEXT) -> str:
    """Printable text of at most `max_len` characters (no control characters)."""
    if required and not value:
        raise LimitError(field, "required")
    if len(value) > max_len:
        raise LimitError(field, f"{quote(value)} is longer than {max_len} characters")
    if not value.isprintable():
        raise LimitError(field, f"{quote(value)} holds control characters")
    return value


def entries(field: str, values: Iterable[str], *, max_len: int = MAX_LIST) -> list[str]:
    """A list of at most `max_len` distinct, printable entries of at most 64 characters each."""
    values = list(values)
    if len(values) > max_len:
        raise LimitError(field, f"{len(values)} entries; at most {max_len}")
    for v in values:
        text(field, v, max_len=64)
    if len(set(values)) != len(values):
        raise LimitError(field, "lists an entry twice")
    return values


# --- the CLI's side: argparse types with the same bounds -------------------------------------------


def arg_int(lo: int, hi: int):
    """An argparse `type` for a whole number in lo..hi (a usage error otherwise)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quote(raw)} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not in {lo}..{hi}")
        return value

    parse.__name__ = "whole number"
    return parse


def arg_float(lo: float, hi: float, *, lo_open: bool = False):
    """An argparse `type` for a finite number in [lo, hi] (or (lo, hi])."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{quote(raw)} is not a number") from None
        try:
            number("value", value, lo, hi, lo_open=lo_open)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None
        return value

    parse.__name__ = "number"
    return parse


# --- every request, whatever its type: the gRPC servers check these before a handler runs ----------

MAX_STRING = 16_384
"""Any string field of a request, in characters (names and models have their own, tighter bounds)."""
MAX_REPEATED = 4096
"""Entries of any repeated field of a request."""


def check_message(message: Message, path: str = "") -> str | None:
    """The first problem of a request message, as `field.path: what is wrong`, or None: a float that
    is NaN or infinite, a string longer than MAX_STRING, a list longer than MAX_REPEATED. Nested
    messages are checked too."""
    for fd, value in message.ListFields():
        where = f"{path}{fd.name}"
        repeated = fd.is_repeated
        items = value if repeated else (value,)
        if repeated and len(value) > MAX_REPEATED:
            return f"{where}: {len(value)} entries; at most {MAX_REPEATED}"
        if fd.type in _FLOATS:
            for x in items:
                if not math.isfinite(x):
                    return f"{where}: {x} is not a finite number"
        elif fd.type == fd.TYPE_STRING:
            for x in items:
                if len(x) > MAX_STRING:
                    return f"{where}: {quote(x)} is longer than {MAX_STRING} characters"
        elif fd.type == fd.TYPE_MESSAGE:
            for x in items:
                if isinstance(x, Message) and (problem := check_message(x, f"{where}.")) is not None:
                    return problem
    return None


_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
