"""Scheduling policies behind one interface (`cncbrain.twin.view`): the baselines, and the learned
MARL policy from `agents` (`marl` loads the shipped policy, `marl:PATH` another one), and the
warm-start teachers of `agents.teachers` (`teacher:NAME`), so they can be measured like any policy."""

from __future__ import annotations

from cncbrain.errors import CncError, UsageError
from cncbrain.policies.baselines import BASELINES, Policy


def known_policies() -> list[str]:
    from agents.teachers import TEACHERS

    return [*BASELINES, "marl", "oracle", *(f"teacher:{t}" for t in TEACHERS)]


def make_policy(name: str) -> Policy:
    """A policy by name: a baseline, `marl` or `marl:PATH`. (`oracle` is not a policy that acts;
    `cncbrain.oracle` computes it.)"""
    if name in BASELINES:
        return BASELINES[name]()
    if name == "marl" or name.startswith("marl:"):
        try:
            from agents.runtime import load_policy
        except ImportError as exc:
            raise CncError(f"policy {name!r} is not available: {exc}") from None
        return load_policy(name.partition(":")[2] or None)
    if name.startswith("teacher:"):
        from agents.teachers import TEACHERS, make_teacher

        if name.removeprefix("teacher:") not in TEACHERS:
            raise UsageError(f"unknown teacher {name!r}; known: {', '.join('teacher:' + t for t in TEACHERS)}")
        return make_teacher(name)
    raise UsageError(f"unknown policy {name!r}; known: {', '.join(known_policies())}")


__all__ = ["BASELINES", "Policy", "known_policies", "make_policy"]
