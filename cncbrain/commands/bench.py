"""`cncbrain bench twin`: simulated seconds per wall second for the built-in scenarios."""

from __future__ import annotations

import time

from cncbrain.commands._output import add_output_arg, print_json, show, wants_json


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of the core (e.g. `cncbrain bench twin`)")
    p.add_argument("what", choices=["twin"], help="twin: simulated time per wall second")
    p.add_argument("--policy", default="least-loaded")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--scenario", action="append", default=None, help="scenario(s) to time (default: all built-in)")
    add_output_arg(p)
    p.set_defaults(func=run)


def time_twin(name: str, policy: str, hours: float, seed: int = 0) -> tuple[float, float]:
    """Wall seconds to simulate `hours` of scenario `name` under `policy` (twin construction excluded)."""
    from agents.catalog import make_policy
    from cncbrain.scenario import load_scenario
    from cncbrain.twin.sim import Twin

    sc = load_scenario(name)
    twin = Twin(sc, seed=seed, duration_s=hours * 3600.0)
    p = make_policy(policy)
    p.reset(seed)
    t0 = time.perf_counter()
    while not twin.done():
        twin.step(p.act(twin.view()))
    wall = time.perf_counter() - t0
    return wall, twin.time_s / wall


def run(args) -> int:
    from rich.table import Table

    from cncbrain.scenario import builtin_scenarios

    names = args.scenario or list(builtin_scenarios())
    table = Table(title=f"twin speed ({args.policy}, {args.hours:g} simulated h, one process)")
    for col in ("scenario", "wall s", "simulated s / wall s"):
        table.add_column(col, justify="right")
    rows = []
    for name in names:
        wall, speed = time_twin(name, args.policy, args.hours)
        rows.append({"scenario": name, "policy": args.policy, "simulated_hours": args.hours, "wall_s": wall,
                     "speedup": speed})
        table.add_row(name, f"{wall:.2f}", f"{speed:,.0f}×")
    if wants_json(args):
        print_json(rows)
    else:
        show(table)
    return 0
