"""How every command prints: one output option, one key style, nothing cut on a pipe.

- `add_output_arg(parser)`: `-o/--output table|json` (and `--json`, the same as `-o json`).
- JSON keys are snake_case, as the protos name their fields (`to_dict`: `preserving_proto_field_name`,
  every field present, defaults included, so a script finds every key on every object).
- Tables: a rich table on a terminal; on a pipe or a file, plain columns separated by two spaces,
  a header row first, one line per row and no cell shortened (`show`), like kubectl's (the table's
  title goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

OUTPUTS = ("table", "json")


def add_output_arg(p: argparse.ArgumentParser, default: str = "table") -> None:
    p.add_argument("-o", "--output", choices=OUTPUTS, default=default,
                   help=f"{' or '.join(OUTPUTS)} (default {default}); json keys are snake_case, as the protos name fields")
    p.add_argument("--json", dest="output", action="store_const", const="json", help="the same as -o json")


def wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "table") == "json"


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(data: Any) -> None:
    """`data`: plain values, protobuf messages, or lists/dicts of them."""
    print(json.dumps(_plain(data), indent=2, ensure_ascii=False))


def _plain(data: Any) -> Any:
    if isinstance(data, Message):
        return to_dict(data)
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def is_terminal() -> bool:
    return sys.stdout.isatty()


def show(table: Any) -> None:
    """Print a rich `Table`: as rich draws it on a terminal, else as plain full-width columns."""
    if is_terminal():
        from rich.console import Console

        Console().print(table)
        return
    headers = [_text(c.header) for c in table.columns]
    columns = [[_text(cell) for cell in c._cells] for c in table.columns]
    rows = list(zip(*columns, strict=True)) if columns else []
    print_rows(headers, rows, title=_text(table.title) if table.title else None)


def _text(value: Any) -> str:
    from rich.text import Text

    if isinstance(value, Text):
        return value.plain
    if isinstance(value, str):
        try:
            return Text.from_markup(value).plain
        except Exception:  # not markup after all
            return value
    return str(value)


def print_rows(headers: Sequence[str], rows: Iterable[Sequence[str]], title: str | None = None) -> None:
    """Plain aligned columns (the last one unpadded); a cell's line breaks become spaces."""
    rows = [[" ".join(str(c).split("\n")) for c in r] for r in rows]
    heads = [h.replace(" ", "_") for h in headers]  # one word each, for awk and cut
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(heads)]
    if title:  # the header row comes first on stdout, as scripts expect; the title is for the eye
        print(title, file=sys.stderr)
    for r in [heads, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
