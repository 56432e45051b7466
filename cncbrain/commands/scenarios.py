"""`cncbrain scenarios`: the built-in scenarios and where their YAML is; `scenarios families`,
`scenarios suites` and `scenarios generate` for the generated ones (`cncbrain.families`)."""

from __future__ import annotations

from pathlib import Path

from cncbrain.errors import CncError


def register(sub) -> None:
    p = sub.add_parser("scenarios", help="list the built-in scenarios; generate scenarios of a family")
    p.set_defaults(func=run)
    ss = p.add_subparsers(dest="scenarios_command", metavar="{families,suites,generate}")
    f = ss.add_parser("families", help="the scenario families, with what each varies")
    f.add_argument("--long", action="store_true", help="the full description of each family")
    f.set_defaults(func=run_families)
    s = ss.add_parser("suites", help="the named suites of generated scenarios (`cncbrain eval --suite`)")
    s.set_defaults(func=run_suites)
    g = ss.add_parser("generate", help="write the YAML of one generated scenario")
    g.add_argument("--family", required=True, help="a family (`cncbrain scenarios families`)")
    g.add_argument("--seed", required=True, help="an integer from 0 to 2^31 − 1")
    g.add_argument("--out", default=None, help="write to this file (folders are created) instead of printing")
    g.set_defaults(func=run_generate)


def _console():
    from rich.console import Console

    return Console(width=None if Console().is_terminal else 200)


def run(args) -> int:
    import numpy as np
    from rich.table import Table

    from cncbrain.scenario import builtin_scenarios, load_scenario
    from cncbrain.twin.pool import build_pool

    table = Table(title="built-in scenarios (use the name, or copy the YAML and pass its path)")
    for col in ("name", "topology", "sites", "services", "hours", "failures", "yaml"):
        table.add_column(col)
    for name, path in builtin_scenarios().items():
        sc = load_scenario(name)
        pool = build_pool(sc, np.random.default_rng(sc.seed))
        table.add_row(name, sc.topology.graphml, str(pool.net.size), ", ".join(s.name for s in sc.inference),
                      f"{sc.duration_s / 3600:g}", str(len(sc.failures)), str(path))
    console = _console()
    console.print(table)
    console.print("[dim]generated scenarios: `cncbrain scenarios families`, `cncbrain scenarios generate --family NAME "
                  "--seed N`; any --scenario option takes family:NAME:SEED[/dim]")
    return 0


def run_families(args) -> int:
    from rich.table import Table

    from cncbrain.families import FAMILIES

    table = Table(title="scenario families (cncbrain scenarios generate --family NAME --seed N; docs/scenarios.md)")
    table.add_column("family", style="bold")
    table.add_column("what varies")
    for f in FAMILIES.values():
        table.add_row(f.name, f.description if args.long else f.summary)
    _console().print(table)
    return 0


def run_suites(args) -> int:
    from rich.table import Table

    from cncbrain.suites import SUITES

    table = Table(title="suites (cncbrain eval --suite NAME)")
    for col in ("suite", "scenarios", "hours", "what"):
        table.add_column(col)
    for s in SUITES.values():
        table.add_row(s.name, str(len(s.scenarios)), "scenario's" if s.hours is None else f"{s.hours:g}", s.summary)
    _console().print(table)
    return 0


def run_generate(args) -> int:
    from cncbrain.families import FAMILIES, to_yaml

    if args.family not in FAMILIES:
        raise CncError(f"unknown scenario family {args.family!r}; families: {', '.join(FAMILIES)}")
    try:
        seed = int(args.seed)
    except ValueError:
        raise CncError(f"--seed: {args.seed!r} is not an integer") from None
    text = to_yaml(args.family, seed)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0
