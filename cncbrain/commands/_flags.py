"""Command-line flags generated from a dataclass, the CleanRL way: one flag per field, named as the
field (`total_steps` → `--total-steps`), typed by its annotation, documented by the string under it,
its default the field's. A flag not given leaves the field's default.

    add_flags(parser, Args)
    args = dataclass_from(Args, parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from cncbrain.opsdoc import attribute_docs

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false") from None


def _scalar(annotation: Any) -> tuple[type, bool] | None:
    """(the scalar type, whether None is allowed) of an annotation flags can carry; None otherwise."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None
        annotation = args[0]
    return (annotation, optional) if annotation in (bool, int, float, str) else None


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that get a flag: those of a scalar type (bool, int, float, str, or one of
    them or None)."""
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if _scalar(hints[f.name]) is not None]


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """A flag for each field of `cls` that `flag_fields` takes, in a group named `title`."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    group = parser.add_argument_group(title or f"{cls.__module__}.{cls.__qualname__}")
    for f in flag_fields(cls):
        scalar = _scalar(hints[f.name])
        assert scalar is not None
        kind, optional = scalar
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        required = default is dataclasses.MISSING
        shown = "required" if required else f"default: {default!r}"
        help_text = f"{docs.get(f.name, '')} ({shown})".strip().replace("%", "%%")
        metavar = "true|false" if kind is bool else "VALUE" if optional else kind.__name__.upper()
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_parse_bool if kind is bool else kind,
                           metavar=metavar, required=required, default=argparse.SUPPRESS, help=help_text)


def dataclass_from(cls: type, namespace: argparse.Namespace) -> Any:
    """`cls` with the fields the command line gave; the others keep their defaults."""
    return cls(**{f.name: getattr(namespace, f.name) for f in flag_fields(cls) if hasattr(namespace, f.name)})
