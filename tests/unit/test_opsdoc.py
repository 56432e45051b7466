"""docs/operations.md lists every metric and every setting, and each service's README its settings:
their generated blocks match the code, and every settings class of the brain is in the generator's
list."""

import ast
from pathlib import Path

from cncbrain import opsdoc

ROOT = Path(__file__).resolve().parents[2]
ABSTRACT = {"cncbrain.settings.ServiceSettings"}
"""Bases whose fields appear under each service that derives from them."""


def test_the_generated_blocks_are_up_to_date():
    assert opsdoc.out_of_date() == [], "run `python -m cncbrain.opsdoc`"


def test_each_service_readme_has_its_settings_table_from_the_code():
    from services.governance.settings import Settings

    text = (ROOT / "services" / "governance" / "README.md").read_text()
    for name in Settings.model_fields:  # AUTH_ENABLED, GOVERNANCE_TARGET, … : none left out
        assert f"`CNC_GOVERNANCE_{name.upper()}`" in text
    stale = text.replace("| `CNC_GOVERNANCE_AUTH_ENABLED` |", "| `CNC_GOVERNANCE_AUTH` |")
    blocks = opsdoc.generated_files()[ROOT / "services" / "governance" / "README.md"]
    assert opsdoc.render(stale, blocks) == text, "the generator rewrites a table edited by hand"


def test_every_settings_class_is_documented():
    found = set()
    for package in ("cncbrain", "services", "agents"):
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and any(
                        getattr(b, "id", getattr(b, "attr", "")).endswith("Settings") for b in node.bases):
                    found.add(f"{module}.{node.name}")
    documented = {f"{cls.__module__}.{cls.__qualname__}" for _, cls in opsdoc.settings_classes()}
    assert found - ABSTRACT == documented, f"add to cncbrain/opsdoc.settings_classes: {found - ABSTRACT - documented}"


def test_every_setting_has_a_description():
    for _, cls in opsdoc.settings_classes():
        docs = opsdoc.attribute_docs(cls)
        missing = [n for n, f in cls.model_fields.items() if not (docs.get(n) or f.description)]
        assert not missing, f"{cls.__module__}.{cls.__qualname__}: write a line under {missing}"
