"""`cncbrain train`: train the per-site MARL policy (MAPPO, `agents.mappo`) on one or more scenarios.

Needs the `train` extra (torch); without torch the command is simply absent from `cncbrain`.
Writes into --out: checkpoint.pt (resumable), policy.npz (best greedy validation, what
`--policy marl:PATH` loads), policy_last.npz, metrics.csv and learning_curve.png.
"""

from __future__ import annotations

import importlib.util
import math
import time

if importlib.util.find_spec("torch") is None:  # the command exists only where torch is installed
    raise ModuleNotFoundError("No module named 'torch'", name="torch")
# torch and agents.mappo are imported when the command runs, not when `cncbrain --help` lists it

DEFAULTS = "agents/mappo.py, Args"


def register(sub) -> None:
    p = sub.add_parser("train", help="train the per-site MARL policy (MAPPO) on the twin")
    p.add_argument("--scenario", default="abilene", help="scenario name(s) or YAML path(s), comma-separated")
    p.add_argument("--steps", type=int, default=None,
                   help=f"MAPPO environment ticks over all env copies (default: total_steps in {DEFAULTS})")
    p.add_argument("--seed", type=int, default=None, help=f"default: seed in {DEFAULTS}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/marl", help="output folder (default runs/marl)")
    p.add_argument("--resume", default="", help="checkpoint.pt to resume from")
    p.add_argument("--envs", type=int, default=None, help=f"env copies stepped together (default: num_envs in {DEFAULTS})")
    p.add_argument("--teacher", default=None, help="policy imitated in the warm start: a teacher of agents.teachers "
                   "(default pack) or a baseline; '' skips it")
    p.add_argument("--bc-rounds", type=int, default=None, help=f"default: bc_rounds in {DEFAULTS}")
    p.add_argument("--bc-episodes", type=int, default=None, help=f"default: bc_episodes in {DEFAULTS}")
    p.add_argument("--hours", type=float, default=None, help="episode length in simulated hours (default: scenario's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from agents.mappo import Args, train

    given = {"total_steps": args.steps, "seed": args.seed, "num_envs": args.envs, "teacher": args.teacher,
             "bc_rounds": args.bc_rounds, "bc_episodes": args.bc_episodes}
    a = Args(scenarios=args.scenario, device=args.device, out=args.out, resume=args.resume,
             duration_s=args.hours * 3600 if args.hours else None,
             **{k: v for k, v in given.items() if v is not None})
    console = Console()
    console.print(f"training on [bold]{a.scenarios}[/] for {a.total_steps:,} ticks, device {a.device}, out {a.out}")
    t0 = time.time()
    last = {"score": math.nan, "val": math.nan, "ret": math.nan}
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:,.0f}/{task.total:,.0f} ticks"), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as progress:
        task = progress.add_task("warm start", total=max(a.total_steps, 1), info="")

        def on_update(row: dict) -> None:
            phase = row.get("phase")
            if phase == "val":
                last["val"] = row["charts/val_score"]
            elif not math.isnan(row.get("charts/score", math.nan)):
                last["score"] = row["charts/score"]
            if "charts/return" in row:
                last["ret"] = row["charts/return"]
            info = f"score {last['score']:.3f}  return {last['ret']:.2f}  val {last['val']:.3f}"
            progress.update(task, completed=row["global_step"], info=info,
                            description="warm start" if phase == "warm" else "MAPPO")

        result = train(a, on_update)
    console.print(f"done in {time.time() - t0:.0f} s: best validation score {result['best_val_score']:.4f}; "
                  f"wrote {a.out}/policy.npz, checkpoint.pt, metrics.csv, learning_curve.png")
    return 0
