"""Suites: named, fixed sets of generated scenarios (`cncbrain.families`) to train, select and
measure policies on. Every suite holds every family; the suites' seeds are disjoint, so no scenario
of `test` is ever seen in training (`train`) or model selection (`validation`).

    members("test")  -> [("zoo", 3000), ("zoo", 3001), …]
    suite("test")    -> [Scenario, …]
    cncbrain eval --suite test

`smoke` is a small, short suite for tests and quick checks (two small scenarios, a quarter hour).
Seeds are the suite's own: train 1000–1999, validation 2000–2999, test 3000–3999, smoke 9000+.
"""

from __future__ import annotations

from dataclasses import dataclass

from cncbrain.errors import UsageError
from cncbrain.families import FAMILIES
from cncbrain.scenario import generate
from cncbrain.twin.scenario import Scenario


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    scenarios: tuple[tuple[str, int], ...]
    """(family, seed) of every scenario."""
    hours: float | None = None
    """Simulated hours per episode (None: each scenario's own duration)."""

    def members(self) -> list[tuple[str, int]]:
        return list(self.scenarios)


def _every_family(seeds: range) -> tuple[tuple[str, int], ...]:
    return tuple((f, s) for f in FAMILIES for s in seeds)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("train", "training: 12 scenarios per family (seeds 1000–1011)", _every_family(range(1000, 1012))),
        Suite("validation", "model selection: 5 per family (seeds 2000–2004)", _every_family(range(2000, 2005))),
        Suite("test", "final measurement, never trained or selected on: 5 per family (seeds 3000–3004)",
              _every_family(range(3000, 3005))),
        Suite("smoke", "two small scenarios (6-site edge pool, Abilene), a quarter hour each: tests, quick checks",
              (("edge", 9002), ("zoo", 9000)), hours=0.25),
    ]
}


def get(name: str) -> Suite:
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return SUITES[name]


def members(name: str) -> list[tuple[str, int]]:
    """(family, seed) of every scenario of the suite, in order."""
    return get(name).members()


def suite(name: str) -> list[Scenario]:
    """The suite's scenarios, generated (each `.source` is `family:NAME:SEED`)."""
    return [generate(f, s) for f, s in members(name)]
