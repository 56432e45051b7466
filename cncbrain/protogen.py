"""Generate the Python code of the protobuf contracts under `proto/` — one command, reproducible.

    python -m cncbrain.protogen            # regenerate the committed code in ./cnc
    python -m cncbrain.protogen --check    # exit 1 when the committed code differs (CI, tests)

Every `proto/cnc/<block>/v1/*.proto` becomes `cnc/<block>/v1/<name>_pb2.py` (messages),
`_pb2.pyi` (mypy-protobuf stubs), `_pb2_grpc.py` and `_pb2_grpc.pyi` (gRPC stubs). The Python
package path equals the proto package (`cnc.scheduler.v1`), so generated imports need no rewriting.
Only grpcio-tools and mypy-protobuf are needed (both in the `dev` extra); buf is used for lint only.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE = "cnc"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
INIT_TEXT = '"""Generated from proto/ by `python -m cncbrain.protogen`; do not edit."""\n'


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / PACKAGE).rglob("*.proto"))


def _plugin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return str(found)


def generate(out: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Generate code for every proto under `root` into `out`; return the files written."""
    from grpc_tools import protoc

    files = proto_files(root)
    if not files:
        raise SystemExit(f"no .proto files under {root / PACKAGE}")
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(f.relative_to(root)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see the message above)")
    written = sorted(p for p in (out / PACKAGE).rglob("*") if p.is_file())
    for directory in {p.parent for p in written}:
        while directory != out:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(INIT_TEXT)
            directory = directory.parent
    return sorted(p for p in (out / PACKAGE).rglob("*") if p.is_file())


def clean(out: Path) -> None:
    """Remove previously generated files so a deleted proto leaves nothing behind."""
    pkg = out / PACKAGE
    if not pkg.exists():
        return
    for path in pkg.rglob("*"):
        if path.is_file() and (path.name.endswith(GENERATED_SUFFIXES) or path.name == "__init__.py"):
            path.unlink()


def drift(committed: Path = REPO_ROOT, root: Path = PROTO_ROOT) -> list[str]:
    """Regenerate into a temporary folder and list the files that differ from `committed`."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root, root)
        fresh = {p.relative_to(fresh_root) for p in (fresh_root / PACKAGE).rglob("*") if p.is_file()}
        pkg = committed / PACKAGE
        have = (
            {p.relative_to(committed) for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
            if pkg.exists()
            else set()
        )
        problems = [f"missing: {p}" for p in sorted(fresh - have)]
        problems += [f"stale (no proto makes it): {p}" for p in sorted(have - fresh)]
        problems += [
            f"differs: {p}"
            for p in sorted(fresh & have)
            if not filecmp.cmp(fresh_root / p, committed / p, shallow=False)
        ]
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cncbrain.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="folder that receives cnc/ (default: repo root)")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift(args.out)
        for line in problems:
            print(line)
        if problems:
            print("generated code drifted from proto/: run `make protos` and commit")
            return 1
        print(f"generated code matches {len(proto_files())} protos")
        return 0
    clean(args.out)
    written = generate(args.out)
    print(f"generated {len(written)} files from {len(proto_files())} protos into {args.out / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
