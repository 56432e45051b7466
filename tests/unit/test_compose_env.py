"""The compose files take none of the variables the brain's own processes read: a `CNC_NATS_URL`
exported for the CLI on the host once reached every container (pointing them at the host's
loopback, where they waited for NATS without a word)."""

import ast
import re
from pathlib import Path

from cncbrain import opsdoc

ROOT = Path(__file__).resolve().parents[2]


def read_by_the_brain() -> set[str]:
    """Every variable a settings class reads, and every literal `CNC_*` name in the code."""
    names = set()
    for _, cls in opsdoc.settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            choices = [alias] if isinstance(alias, str) else list(getattr(alias, "choices", []) or [])
            names |= {c.upper() for c in choices if isinstance(c, str)} or {f"{prefix}{name}".upper()}
    for package in ("cncbrain", "services", "agents"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and re.fullmatch(r"CNC_[A-Z0-9_]+", node.value):
                    names.add(node.value)
    return names


def test_compose_files_take_no_variable_the_brain_reads():
    taken = set()
    for compose in (ROOT / "deploy").glob("docker-compose*.yml"):
        taken |= set(re.findall(r"\$\{(CNC_[A-Z0-9_]+)", compose.read_text()))
    assert taken, "no interpolated variables found"
    clash = taken & read_by_the_brain()
    assert not clash, f"the compose files read {sorted(clash)}, which the CLI or the services read too"
