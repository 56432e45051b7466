"""Scenarios by name: a built-in one (`cncbrain/scenarios/*.yaml`, usable by name), a generated one
(`family:NAME:SEED`, `cncbrain.families`) or a YAML file by path, validated into the twin's
scenario schema (`cncbrain.twin.scenario.Scenario`). Above both the twin and the families.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from cncbrain import families
from cncbrain.errors import ScenarioError
from cncbrain.families import FAMILY_PREFIX
from cncbrain.twin.scenario import Scenario, parse_scenario


def scenarios_dir() -> Path:
    return Path(str(resources.files("cncbrain") / "scenarios"))


def builtin_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(scenarios_dir().glob("*.yaml"))}


def generate(family: str, seed: int) -> Scenario:
    """Scenario `seed` of the family `family` (`cncbrain.families`): validated, identical for the same
    (family, seed); its source is `family:NAME:SEED`."""
    data = families.scenario_data(family, seed)
    key = families.key(family, int(seed))
    try:
        return parse_scenario(data, key)
    except ScenarioError as exc:  # a generated scenario that does not validate is a bug
        raise RuntimeError(f"generated scenario {key} is invalid:\n{exc}") from None


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name (`abilene`, `geant`, …), a generated one as `family:NAME:SEED`
    (`cncbrain.families`), or a YAML file by path."""
    key = str(name_or_path)
    if key.startswith(FAMILY_PREFIX):
        return generate(*families.parse_key(key))
    builtin = builtin_scenarios()
    if key in builtin:
        path = builtin[key]
    else:
        path = Path(key)
        if not path.exists():
            raise ScenarioError(
                f"scenario {key!r}: no such file, not a built-in scenario (built-in: {', '.join(builtin)}) and "
                f"not a generated one ({FAMILY_PREFIX}NAME:SEED; `cncbrain scenarios families` lists the families)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenario(data, str(path))
