"""Every scheduling policy by name, for measuring one (`cncbrain eval`, the benchmarks) or teaching
with one (`cncbrain train --teacher`):

| name           | policy                                                                        |
|----------------|-------------------------------------------------------------------------------|
| a baseline     | `cncbrain.policies.BASELINES` (random, round-robin, least-loaded, greedy, …)  |
| `marl`         | the shipped learned policy (`agents.runtime`)                                 |
| `marl:PATH`    | a policy file (`.npz`), or a training checkpoint (`.pt`, needs torch)         |
| `teacher:NAME` | a warm-start teacher (`agents.teachers`)                                      |

(`oracle` is listed but does not act; `cncbrain.oracle` computes its bound.) The one place that
resolves these names: below the trainer (`agents.mappo` takes its teachers from here), above the
runtime, the teachers and the checkpoint reader, so the core's policies know nothing of the agents.
"""

from __future__ import annotations

from pathlib import Path

from agents.teachers import TEACHERS
from cncbrain.errors import CncError, UsageError
from cncbrain.policies import BASELINES, Policy


def known_policies() -> list[str]:
    return [*BASELINES, "marl", "oracle", *(f"teacher:{t}" for t in TEACHERS)]


def make_policy(name: str) -> Policy:
    """A policy by name (see the module docstring); an unknown name is a `UsageError` listing the known."""
    if name in BASELINES:
        return BASELINES[name]()
    if name == "marl" or name.startswith("marl:"):
        try:
            return _learned(name)
        except (OSError, ValueError, KeyError) as exc:  # no such file, not a policy file, other sizes
            raise UsageError(f"policy {name!r}: {exc}") from None
    if name.startswith("teacher:"):
        if name.removeprefix("teacher:") not in TEACHERS:
            raise UsageError(f"unknown teacher {name!r}; known: {', '.join('teacher:' + t for t in TEACHERS)}")
        return TEACHERS[name.removeprefix("teacher:")]()
    raise UsageError(f"unknown policy {name!r}; known: {', '.join(known_policies())}")


def make_teacher(name: str) -> Policy:
    """A warm-start teacher by name: a teacher (`pack` or `teacher:pack`), or any policy `make_policy` knows."""
    name = name.removeprefix("teacher:")
    if name in TEACHERS:
        return TEACHERS[name]()
    return make_policy(name)


def _learned(name: str) -> Policy:
    from agents.runtime import load_policy

    path = name.partition(":")[2] or None
    if path is None or Path(path).suffix != ".pt":
        return load_policy(path)
    try:  # a training checkpoint: read with the training stack, only now
        from agents.checkpoint import load_checkpoint_weights
    except ImportError as exc:
        raise CncError(f"policy {name!r} is a training checkpoint, which needs torch: {exc}") from None
    if not Path(path).exists():
        raise FileNotFoundError(f"no MARL policy at {path}")
    return load_policy(path, load_checkpoint_weights(path))
