"""The static checks `make test` runs with the tests (configured in pyproject.toml): ruff, mypy on
services/ and cncbrain/ with zero errors, and import-linter (the layers of docs/architecture.md,
no import cycles, a torch-free live brain); and every relative link of the Markdown files resolves
to a file of the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str) -> None:
    tool = BIN / name if (BIN / name).exists() else shutil.which(name)
    if tool is None:
        pytest.fail(f"{name} is not installed: `make venv` (pip install -e '.[dev]') installs the checks")
    res = subprocess.run([str(tool), *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"{name} {' '.join(args)} failed:\n{res.stdout[-8000:]}\n{res.stderr[-2000:]}"


def test_ruff():
    run_tool("ruff", "check", ".")


def test_mypy():
    run_tool("mypy")  # which files, and how strictly: [tool.mypy]


def test_import_layers():
    run_tool("lint-imports")  # the contracts: [tool.importlinter]


def test_every_module_of_cncbrain_has_a_layer():
    """A new module of the core package must be placed in the layers contract (else nothing checks
    what it imports and who imports it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    children = {f"cncbrain.{p.stem}" for p in (ROOT / "cncbrain").glob("*.py") if p.stem != "__init__"}
    children |= {f"cncbrain.{p.parent.name}" for p in (ROOT / "cncbrain").glob("*/__init__.py")}
    assert children - placed == set(), "modules of cncbrain in no layer of [tool.importlinter] 'layers'"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.md", "**/*.md"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout.strip():
        return sorted({ROOT / line for line in tracked.stdout.split()})
    return sorted(p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts)


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for md in markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold commands, not links
        for m in LINK.finditer(text):
            target = (m.group(1) or m.group(2)).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, or http:, mailto:, …
                continue
            path = (md.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that are not in the repository:\n" + "\n".join(broken)


def test_test_helpers_live_in_tests_support():
    """A module under tests/ that is neither a test nor a conftest is a helper: it belongs in
    tests/support, where the next test finds it instead of writing its own copy."""
    stray = [p.relative_to(ROOT) for p in (ROOT / "tests").rglob("*.py")
             if not p.name.startswith("test_") and p.name not in ("conftest.py", "__init__.py")
             and "support" not in p.relative_to(ROOT / "tests").parts]
    assert not stray, f"helpers outside tests/support: {stray}"


FORBIDDEN = re.compile(r"(?i:\bissues? #?\d+\b)|\bphysics\.md|\bARCHITECTURE\.md|\.\./shared\b")


def test_code_and_docs_refer_only_to_what_is_in_the_repository():
    """No issue numbers (the tracker is not part of the product) and no documents outside the
    repository: the facts the project borrowed are written into docs/ with their sources."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / f for f in tracked if f.endswith((".py", ".md", ".toml", ".yml", ".yaml", ".proto", ".cfg", ".sh"))
             and not f.startswith("cnc/") and f != "tests/test_checks.py"]
    found = [f"{p.relative_to(ROOT)}:{n}: {m.group(0)}" for p in files if p.exists()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) for m in FORBIDDEN.finditer(line)]
    assert not found, "\n".join(found)
