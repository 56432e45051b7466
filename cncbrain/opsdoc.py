"""The generated parts of docs/operations.md — every metric (from `cncbrain.metrics.CATALOG`) and
every setting (from the pydantic settings classes of the brain, with their environment variable,
type, default and the description written under each field) — and the settings table of each
service's README, from the same classes.

    python -m cncbrain.opsdoc            # rewrite the generated blocks
    python -m cncbrain.opsdoc --check    # exit 1 when a file is out of date (the test does this)

A block sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; the text
around the blocks is written by hand.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path

from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
SERVICES = ("perception", "scheduler", "adaptation", "governance")


def settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    """(who reads it, class) for every settings class of the brain, in the order documented."""
    from agents.executor_slurm import SlurmSettings
    from cncbrain.metrics import MetricsSettings
    from cncbrain.settings import BusSettings, CncSettings
    from services.adaptation.settings import Settings as Adaptation
    from services.governance.settings import Settings as Governance
    from services.perception.settings import Settings as Perception
    from services.scheduler.settings import Settings as Scheduler

    return [("site agents, emulator, CLI (`cncbrain agent`, `cncbrain emulate`)", CncSettings),
            ("perception", Perception), ("scheduler", Scheduler), ("adaptation", Adaptation),
            ("governance", Governance),
            ("a site agent on a Slurm cluster (`cncbrain agent --executor slurm`; docs/executors.md)", SlurmSettings),
            ("every process: JetStream layout", BusSettings),
            ("every process: the /metrics endpoint", MetricsSettings)]


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field, through the class's bases defined in this
    repository (nearest wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source_file = inspect.getsourcefile(klass)
        except TypeError:  # a built-in class
            continue
        path = Path(source_file).resolve() if source_file else None
        if path is None or not path.is_relative_to(ROOT) or "site-packages" in path.parts:
            continue  # a library's class (pydantic's bases): only this repository's fields are documented here
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "unset"
    return getattr(annotation, "__name__", str(annotation))


def _env_names(prefix: str, name: str, field: typing.Any) -> str:
    """The variable(s) a field is read from: its alias(es) when it has one, else PREFIX + NAME."""
    alias = field.validation_alias
    if isinstance(alias, str):
        names = [alias]
    elif alias is not None and hasattr(alias, "choices"):
        names = [c for c in alias.choices if isinstance(c, str)]
    else:
        names = [f"{prefix}{name}"]
    return ", ".join(f"`{n.upper()}`" for n in names)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if value == "":
        return '""'
    return f"`{value}`"


def settings_table(cls: type[BaseSettings]) -> list[str]:
    """The Markdown table of one settings class: variable, type, default, what it does."""
    prefix = cls.model_config.get("env_prefix", "")
    docs = attribute_docs(cls)
    out = ["| variable | type | default | what it does |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        text = docs.get(name) or field.description or ""
        bounds = [f"{k} {v}" for m in field.metadata for k, v in
                  (("≥", getattr(m, "ge", None)), (">", getattr(m, "gt", None)), ("≤", getattr(m, "le", None)))
                  if v is not None]
        kind = _type(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        out.append(f"| {_env_names(prefix, name, field)} | {kind} | {_default(field.default)} | {_cell(text)} |")
    return out


def settings_block() -> str:
    out = []
    for who, cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        out += [f"### `{prefix}*` — {who}", "", f"`{cls.__module__}.{cls.__qualname__}`", "", *settings_table(cls), ""]
    return "\n".join(out).rstrip() + "\n"


def service_settings_block(service: str) -> Callable[[], str]:
    """The settings table of one service (its README's block)."""

    def make() -> str:
        cls = dict(settings_classes())[service]
        return "\n".join(settings_table(cls)) + "\n"

    return make


def metrics_block() -> str:
    from cncbrain.metrics import CATALOG

    out = ["| metric | type | labels | exported by | meaning |", "| --- | --- | --- | --- | --- |"]
    for m in CATALOG:
        labels = ", ".join(f"`{x}`" for x in m.labels) or "—"
        out.append(f"| `{m.name}` | {m.kind} | {labels} | {m.process} | {_cell(m.help)} |")
    return "\n".join(out) + "\n"


BLOCKS = {"metrics": metrics_block, "settings": settings_block}


def generated_files() -> dict[Path, dict[str, Callable[[], str]]]:
    """Every file with generated blocks, and how each of its blocks is made."""
    files: dict[Path, dict[str, Callable[[], str]]] = {DOC: dict(BLOCKS)}
    for service in SERVICES:
        files[ROOT / "services" / service / "README.md"] = {"settings": service_settings_block(service)}
    return files


def render(text: str, blocks: dict[str, Callable[[], str]] | None = None, path: Path = DOC) -> str:
    for name, make in (BLOCKS if blocks is None else blocks).items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end generated: {name} -->)", re.S)
        found = pattern.search(text)
        if found is None:
            raise SystemExit(f"{path}: no block `<!-- generated: {name} -->` … `<!-- end generated: {name} -->`")
        text = text[:found.end(1)] + make() + text[found.start(2):]
    return text


def out_of_date() -> list[Path]:
    """The files whose generated blocks do not match the code."""
    return [path for path, blocks in generated_files().items() if render(path.read_text(), blocks, path) != path.read_text()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = out_of_date()
        for path in stale:
            print(f"{path} is out of date: run `python -m cncbrain.opsdoc`", file=sys.stderr)
        return 1 if stale else 0
    for path, blocks in generated_files().items():
        current = path.read_text()
        wanted = render(current, blocks, path)
        if wanted != current:
            path.write_text(wanted)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
