"""`cncbrain scenarios`: the built-in scenarios and where their YAML is."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("scenarios", help="list the built-in scenarios and where their YAML is")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from rich.console import Console
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
    Console(width=None if Console().is_terminal else 200).print(table)
    return 0
