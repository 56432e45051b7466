"""`cncbrain train`: train the per-site MARL policy (MAPPO, `agents.mappo`) on one or more scenarios.

Every setting of the training is a flag named as its field of `agents.train_args.Args` (the
CleanRL way: `--total-steps`, `--num-envs`, `--scenarios suite:train`, `--val-scenarios
suite:validation`, …), with the field's type, default and docstring: `cncbrain train --help`
lists them all.

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


def register(sub) -> None:
    from agents.train_args import Args
    from cncbrain.commands._flags import add_flags

    p = sub.add_parser("train", help="train the per-site MARL policy (MAPPO) on the twin; every flag is a field of "
                                     "agents.train_args.Args")
    add_flags(p, Args, "training settings (agents.train_args.Args)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from agents.mappo import train
    from agents.train_args import Args
    from cncbrain.commands._flags import dataclass_from

    a = dataclass_from(Args, args)
    for spec in filter(None, (a.scenarios, a.val_scenarios)):
        for item in spec.split(","):
            if item.strip().startswith("suite:"):
                from cncbrain.suites import suite

                suite(item.strip().removeprefix("suite:"))  # an unknown suite: the one-line error, before any work
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
            if not console.is_terminal:  # a log file: one plain line per event
                keys = ("round", "episodes", "of", "charts/score", "charts/val_score", "charts/bc_accuracy",
                        "charts/bc_accuracy_by_teacher", "charts/teacher_pools",
                        "losses/approx_kl", "losses/entropy", "perf/collect_s", "perf/train_s")
                shown = " ".join(f"{k.split('/')[-1]}={row[k]:.4g}" if isinstance(row[k], float) else f"{k.split('/')[-1]}={row[k]}"
                                 for k in keys if k in row)
                print(f"[{time.time() - t0:7.0f} s] {phase} update={row.get('update')} step={row.get('global_step')} {shown}",
                      flush=True)
            if phase == "warm-episode":
                return
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
