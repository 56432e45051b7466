"""Run the benchmarks: all of them, or those named on the command line (`twin`, `env`, …), each
with its default options (run `python benchmarks/bench_NAME.py --help` for a benchmark's own)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    wanted = argv or names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"\n=== benchmarks/bench_{name}.py ===", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        module.main([])  # defaults: the names given here are not the benchmark's own arguments
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
