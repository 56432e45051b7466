"""`cncbrain scenarios`: the built-in scenarios and where their YAML is; `scenarios families`,
`scenarios suites` and `scenarios generate` for the generated ones (`cncbrain.families`)."""

from __future__ import annotations

from pathlib import Path

from cncbrain.commands._output import add_output_arg, is_terminal, print_json, show, wants_json
from cncbrain.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("scenarios", help="list the built-in scenarios; generate scenarios of a family")
    add_output_arg(p)
    p.set_defaults(func=run)
    ss = p.add_subparsers(dest="scenarios_command", metavar="{families,suites,generate}")
    f = ss.add_parser("families", help="the scenario families, with what each varies")
    f.add_argument("--long", action="store_true", help="the full description of each family")
    add_output_arg(f)
    f.set_defaults(func=run_families)
    s = ss.add_parser("suites", help="the named suites of generated scenarios (`cncbrain eval --suite`)")
    add_output_arg(s)
    s.set_defaults(func=run_suites)
    g = ss.add_parser("generate", help="write the YAML of one generated scenario")
    g.add_argument("--family", required=True, help="a family (`cncbrain scenarios families`)")
    g.add_argument("--seed", required=True, help="an integer from 0 to 2^31 − 1")
    g.add_argument("--out", default=None, help="write to this file (folders are created) instead of printing")
    g.set_defaults(func=run_generate)


def _print(args, title: str, rows: list[dict], note: str = "") -> None:
    """`rows` as JSON (-o json) or as a table (`show`: nothing cut on a pipe)."""
    from rich.table import Table

    if wants_json(args):
        print_json(rows)
        return
    table = Table(title=title)
    for col in rows[0] if rows else ():
        table.add_column(col, style="bold" if col in ("family", "suite") else None)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    show(table)
    if note and is_terminal():
        from rich.console import Console

        Console().print(f"[dim]{note}[/dim]")


def run(args) -> int:
    import numpy as np

    from cncbrain.scenario import builtin_scenarios, load_scenario
    from cncbrain.twin.pool import build_pool

    rows = []
    for name, path in builtin_scenarios().items():
        sc = load_scenario(name)
        pool = build_pool(sc, np.random.default_rng(sc.seed))
        rows.append({"name": name, "topology": sc.topology.graphml, "sites": pool.net.size,
                     "services": [s.name for s in sc.inference] if wants_json(args) else ", ".join(s.name for s in sc.inference),
                     "hours": sc.duration_s / 3600, "failures": len(sc.failures), "yaml": str(path)})
    _print(args, "built-in scenarios (use the name, or copy the YAML and pass its path)", rows,
           "generated scenarios: `cncbrain scenarios families`, `cncbrain scenarios generate --family NAME "
           "--seed N`; any --scenario option takes family:NAME:SEED")
    return 0


def run_families(args) -> int:
    from cncbrain.families import FAMILIES

    rows = [{"family": f.name, "what_varies": f.description if args.long else f.summary} for f in FAMILIES.values()]
    _print(args, "scenario families (cncbrain scenarios generate --family NAME --seed N; docs/scenarios.md)", rows)
    return 0


def run_suites(args) -> int:
    from cncbrain.suites import SUITES

    rows = [{"suite": s.name, "scenarios": len(s.scenarios), "hours": s.hours if wants_json(args) else
             ("scenario's" if s.hours is None else f"{s.hours:g}"), "what": s.summary} for s in SUITES.values()]
    _print(args, "suites (cncbrain eval --suite NAME)", rows)
    return 0


def run_generate(args) -> int:
    from cncbrain.families import FAMILIES, to_yaml
    from cncbrain.scenario import generate

    if args.family not in FAMILIES:
        raise UsageError(f"unknown scenario family {args.family!r}; families: {', '.join(FAMILIES)}")
    try:
        seed = int(args.seed)
    except ValueError:
        raise UsageError(f"--seed: {args.seed!r} is not an integer") from None
    generate(args.family, seed)  # validates (a generated scenario that does not is a bug)
    text = to_yaml(args.family, seed)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0
