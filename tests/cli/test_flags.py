"""Flags generated from a dataclass (`cncbrain.commands._flags`): one per field, named and typed as
the field, documented by its docstring; what is not given keeps the field's default; a bad value is
argparse's usage error naming the flag."""

import argparse
from dataclasses import dataclass, field

import pytest

from cncbrain.commands._flags import add_flags, dataclass_from, flag_fields


@dataclass
class Knobs:
    total_steps: int = 100
    """Ticks to run."""
    learning_rate: float = 3e-4
    """Adam's step, 100 % of it."""
    anneal_lr: bool = True
    """Decay the step."""
    scenarios: str = "abilene"
    duration_s: float | None = None
    """Shorter episodes."""
    notes: dict = field(default_factory=dict)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="t")
    add_flags(parser, Knobs)
    return parser, dataclass_from(Knobs, parser.parse_args(list(argv)))


def test_every_scalar_field_is_a_flag_of_the_same_name_and_type():
    assert [f.name for f in flag_fields(Knobs)] == ["total_steps", "learning_rate", "anneal_lr", "scenarios", "duration_s"]
    _, k = parse("--total-steps", "7", "--learning-rate", "0.01", "--anneal-lr", "false", "--scenarios", "geant",
                 "--duration-s", "360")
    assert k == Knobs(total_steps=7, learning_rate=0.01, anneal_lr=False, scenarios="geant", duration_s=360.0)


def test_what_is_not_given_keeps_the_dataclass_default():
    _, k = parse("--total-steps", "7")
    assert k == Knobs(total_steps=7)


def test_help_carries_the_field_docstring_and_default():
    parser, _ = parse()
    text = parser.format_help()
    assert "--total-steps INT" in text and "Ticks to run. (default: 100)" in text
    assert "100 % of it" in text and "--anneal-lr true|false" in text


@pytest.mark.parametrize("argv, what", [
    (("--total-steps", "many"), "--total-steps: invalid int value: 'many'"),
    (("--anneal-lr", "maybe"), "--anneal-lr: 'maybe' is not true or false"),
    (("--notes", "x"), "unrecognized arguments: --notes x"),
])
def test_a_bad_value_is_a_usage_error_naming_the_flag(argv, what, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2 and what in capsys.readouterr().err


def test_cncbrain_train_has_a_flag_for_every_training_setting():
    """`cncbrain train` exposes `agents.train_args.Args` as is: every field is a flag of the same
    name, and what the command line gives is what training gets."""
    pytest.importorskip("torch")
    import dataclasses

    from agents.train_args import Args
    from cncbrain.cli import build_parser

    parser = build_parser("train")
    fields = {f.name for f in dataclasses.fields(Args)} - {"extra"}
    assert {f.name for f in flag_fields(Args)} == fields
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert all(f"--{name.replace('_', '-')}" in help_text for name in fields)
    args = parser.parse_args(["train", "--scenarios", "suite:train", "--total-steps", "0", "--credit", "0.5",
                              "--anneal-lr", "false", "--duration-s", "360"])
    a = dataclass_from(Args, args)
    assert a == Args(scenarios="suite:train", total_steps=0, credit=0.5, anneal_lr=False, duration_s=360.0)
