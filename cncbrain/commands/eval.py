"""`cncbrain eval`: run policies over seeds on a scenario in the twin and compare them."""

from __future__ import annotations

import math

from cncbrain.errors import CncError


def register(sub) -> None:
    from cncbrain.policies import known_policies

    p = sub.add_parser("eval", help="evaluate scheduling policies on a scenario in the digital twin")
    p.add_argument("--scenario", default="abilene", help="built-in scenario name or YAML path (default: abilene)")
    p.add_argument("--policy", default="random,round-robin,least-loaded,greedy,kpa,ray-serve,oracle",
                   help=f"comma-separated policies; known: {', '.join(known_policies())} (marl:PATH loads a "
                        "policy file; teacher:NAME measures a MARL warm-start teacher)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--seed-start", type=int, default=None, help="first seed (default: the scenario's seed)")
    p.add_argument("--hours", type=float, default=None, help="simulated hours (default: the scenario's duration)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON to this file")
    p.add_argument("--plot", default=None, help="draw the comparison as a PNG to this file")
    p.set_defaults(func=run)


def _fmt(mean: float, std: float, metric: str) -> str:
    if math.isnan(mean):
        return "—"
    digits = 1 if metric in ("cost_usd", "wan_gb") else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def run(args) -> int:
    # heavy imports (scipy, matplotlib, pydantic models) only when the command runs
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cncbrain.evaluate import METRICS, evaluate, plot, summarise, write_json
    from cncbrain.policies import make_policy
    from cncbrain.scenario import load_scenario

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise CncError("--policy: give at least one policy")
    for name in policies:
        if name != "oracle":
            make_policy(name)
    if args.seeds < 1:
        raise CncError("--seeds must be at least 1")
    if args.hours is not None and args.hours <= 0:
        raise CncError("--hours must be positive")
    scenario = load_scenario(args.scenario)
    start = scenario.seed if args.seed_start is None else args.seed_start
    seeds = list(range(start, start + args.seeds))
    duration = args.hours * 3600.0 if args.hours else None
    console = Console(width=None if Console().is_terminal else 200)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"{scenario.name}: {policies[0]} seed {seeds[0]}", total=len(policies) * len(seeds))

        def done(r):
            progress.advance(task)
            progress.update(task, description=f"{scenario.name}: {r.policy} seed {r.seed} score {r.metrics['score']:.3f}")

        results = evaluate(scenario, policies, seeds, duration, on_done=done)
    summary = summarise(results)
    table = Table(title=f"{scenario.name}: mean ± std over seeds {seeds[0]}–{seeds[-1]}")
    table.add_column("policy", style="bold")
    for m in METRICS:
        table.add_column(m, justify="right")
    best = max((p for p in policies if p != "oracle"), key=lambda p: summary[p]["score"]["mean"], default=None)
    for p in policies:
        style = "green" if p == best else ("dim" if p == "oracle" else None)
        table.add_row(p, *[_fmt(summary[p][m]["mean"], summary[p][m]["std"], m) for m in METRICS], style=style)
    console.print(table)
    if "oracle" in policies:
        console.print("[dim]oracle: LP upper bound on score (fluid relaxation); metrics it does not model are —[/dim]")
    if args.json_out:
        write_json(args.json_out, scenario.name, results)
        console.print(f"wrote {args.json_out}")
    if args.plot:
        plot(args.plot, scenario.name, results)
        console.print(f"wrote {args.plot}")
    return 0
