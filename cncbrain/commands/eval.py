"""`cncbrain eval`: run policies over seeds on a scenario in the twin and compare them."""

from __future__ import annotations

import math
import time
from pathlib import Path

from cncbrain.commands._output import OUTPUTS, print_json, show, wants_json
from cncbrain.errors import UsageError


def register(sub) -> None:
    from agents.catalog import known_policies

    p = sub.add_parser("eval", help="evaluate scheduling policies on a scenario or a suite of scenarios in the twin")
    p.add_argument("--scenario", default=None,
                   help="built-in scenario name, family:NAME:SEED or YAML path (default: abilene)")
    p.add_argument("--suite", default=None, help="a suite of generated scenarios instead (`cncbrain scenarios suites`)")
    p.add_argument("--policy", default="random,round-robin,least-loaded,greedy,kpa,ray-serve,oracle",
                   help=f"comma-separated policies; known: {', '.join(known_policies())} (marl:PATH loads a "
                        "policy file; teacher:NAME measures a MARL warm-start teacher)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per scenario (default 3; 1 with --suite)")
    p.add_argument("--seed-start", type=int, default=None, help="first seed (default: the scenario's seed)")
    p.add_argument("--hours", type=float, default=None, help="simulated hours (default: the scenario's duration)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON to this file")
    p.add_argument("--plot", default=None, help="draw the comparison as a PNG to this file")
    p.add_argument("--workers", type=int, default=None, help="worker processes for --suite (default: CPU count)")
    p.add_argument("--with", dest="with_json", action="append", default=[], metavar="JSON",
                   help="with --suite: the results of a previous --json of the same suite (same code, seeds, hours) "
                        "for the policies not run now, e.g. stored baselines; repeatable")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                   help="table (default), or json: the results as --json writes them, on stdout (progress on stderr)")
    p.set_defaults(func=run)


def _console(args):
    """Tables on stdout, wide enough on a pipe; with -o json everything but the JSON goes to stderr."""
    from rich.console import Console

    return Console(stderr=wants_json(args), width=None if Console().is_terminal else 250)


def _fmt(mean: float, std: float, metric: str) -> str:
    if math.isnan(mean):
        return "—"
    digits = 1 if metric in ("cost_usd", "wan_gb") else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def run(args) -> int:
    # heavy imports (scipy, matplotlib, pydantic models) only when the command runs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from agents.catalog import make_policy
    from cncbrain.evaluate import METRICS, evaluate, plot, summarise, write_json
    from cncbrain.scenario import load_scenario

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise UsageError("--policy: give at least one policy")
    if len(set(policies)) != len(policies):
        raise UsageError("--policy: a policy is named twice")
    for name in policies:
        if name != "oracle":
            make_policy(name)
    if args.seeds is not None and args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.hours is not None and args.hours <= 0:
        raise UsageError("--hours must be positive")
    if args.suite is not None:
        if args.scenario is not None:
            raise UsageError("give --scenario or --suite, not both")
        if args.seed_start is not None:
            raise UsageError("--seed-start: a suite runs each scenario from its own seed")
        return _run_suite(args, policies)
    if args.with_json:
        raise UsageError("--with: only with --suite")
    args.seeds = args.seeds or 3
    scenario = load_scenario(args.scenario or "abilene")
    start = scenario.seed if args.seed_start is None else args.seed_start
    seeds = list(range(start, start + args.seeds))
    duration = args.hours * 3600.0 if args.hours else None
    console = _console(args)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"{scenario.name}: {policies[0]} seed {seeds[0]}", total=len(policies) * len(seeds))

        def done(r):
            progress.advance(task)
            progress.update(task, description=f"{scenario.name}: {r.policy} seed {r.seed} score {r.metrics['score']:.3f}")

        results = evaluate(scenario, policies, seeds, duration, on_done=done)
    summary = summarise(results)
    if wants_json(args):
        from cncbrain.evaluate import to_json

        print_json(to_json(scenario.name, results))
    table = Table(title=f"{scenario.name}: mean ± std over seeds {seeds[0]}–{seeds[-1]}")
    table.add_column("policy", style="bold")
    for m in METRICS:
        table.add_column(m, justify="right")
    best = max((p for p in policies if p != "oracle"), key=lambda p: summary[p]["score"]["mean"], default=None)
    for p in policies:
        style = "green" if p == best else ("dim" if p == "oracle" else None)
        table.add_row(p, *[_fmt(summary[p][m]["mean"], summary[p][m]["std"], m) for m in METRICS], style=style)
    if not wants_json(args):
        show(table)
    if "oracle" in policies:
        console.print("[dim]oracle: LP upper bound on score (fluid relaxation); metrics it does not model are —[/dim]")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json_out, scenario.name, results)
        console.print(f"wrote {args.json_out}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(args.plot, scenario.name, results)
        console.print(f"wrote {args.plot}")
    return 0


def _run_suite(args, policies: list[str]) -> int:
    import os

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from cncbrain import suites
    from cncbrain.evaluate import METRICS
    from cncbrain.suite_eval import (
        add_stored,
        evaluate_suite,
        fmt_share,
        plot_suite,
        read_stored,
        summarise_suite,
        write_suite_json,
    )

    suite = suites.get(args.suite)
    members = suite.members()
    seeds = args.seeds or 1
    hours = args.hours if args.hours is not None else suite.hours
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    stored = [read_stored(path, suite.name, seeds, hours) for path in args.with_json]
    console = _console(args)
    total = len(members) * len(policies) * seeds
    t0 = time.time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"suite {suite.name}: generating {len(members)} scenarios", total=total)

        def done(key, policy, r):
            progress.advance(task)
            progress.update(task, description=f"{key.removeprefix('family:')} {policy} seed {r.seed}: "
                                              f"{r.metrics['score']:.3f}")

        results = evaluate_suite(members, policies, seeds, hours * 3600.0 if hours else None, workers, done)
    wall = time.time() - t0
    for d in stored:
        policies = [*add_stored(results, d), *policies]
    summary = summarise_suite(results)
    pol = summary["policies"]

    table = Table(title=f"suite {suite.name}: score per scenario (mean over {seeds} seed(s); * best, oracle excluded)")
    for col in ("scenario", "sites"):
        table.add_column(col)
    for p in policies:
        table.add_column(p, justify="right")
    for row in summary["scenarios"]:
        cells = []
        for p in policies:
            v = row["policies"][p]["score"]
            text = "—" if v is None else f"{v:.3f}"
            cells.append(f"[bold green]{text}*[/]" if p in row["best"] else (f"[dim]{text}[/]" if p == "oracle" else text))
        table.add_row(row["name"], str(row["sites"]), *cells)
    console.print(table)

    table = Table(title=f"suite {suite.name}: mean ± std over {len(results)} scenarios")
    table.add_column("policy", style="bold")
    for m in METRICS:
        table.add_column(m, justify="right")
    table.add_column("best on", justify="right")
    top = max((p for p in policies if p != "oracle"), key=lambda p: pol[p]["score"] or -1, default=None)
    for p in policies:
        style = "green" if p == top else ("dim" if p == "oracle" else None)
        table.add_row(p, *[_fmt(pol[p][m] if pol[p][m] is not None else math.nan,
                                pol[p]["std"][m] if pol[p]["std"][m] is not None else math.nan, m) for m in METRICS],
                      fmt_share(pol[p]["best_share"]), style=style)
    console.print(table)

    fams = summary["families"]
    table = Table(title="per family: mean score / share of the best baseline's gap to the oracle closed")
    table.add_column("family", style="bold")
    table.add_column("n", justify="right")
    for p in policies:
        table.add_column(p, justify="right")
    for f, row in fams.items():
        cells = []
        for p in policies:
            x = row["policies"][p]
            score = "—" if x["score"] is None else f"{x['score']:.3f}"
            cells.append(score if p == "oracle" else f"{score} / {fmt_share(x['gap_closed'])}")
        table.add_row(f, str(row["scenarios"]), *cells)
    console.print(table)
    console.print(f"[dim]best baseline = the best of {', '.join(summary['baselines'])} on each scenario; gap closed = "
                  "Σ(policy − best baseline) / Σ(oracle − best baseline) over the family's scenarios. "
                  f"{total} episodes in {wall:.0f} s with {workers} worker(s).[/dim]")
    extra = {"seeds": seeds, "hours": hours, "workers": workers, "wall_s": round(wall, 1)}
    if wants_json(args):
        print_json({"suite": suite.name, **extra, **summary})
    if args.json_out:
        write_suite_json(args.json_out, suite.name, summary, extra)
        console.print(f"wrote {args.json_out}")
    if args.plot:
        plot_suite(args.plot, suite.name, summary)
        console.print(f"wrote {args.plot}")
    return 0
