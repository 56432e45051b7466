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
    p.add_argument("--scenario", default=None,
                   help="scenario name(s) or YAML path(s), comma-separated (default abilene unless --suite)")
    p.add_argument("--suite", default=None, help="train on the scenarios of a suite (cncbrain.suites), e.g. train")
    p.add_argument("--val-suite", default=None,
                   help="select the best policy on this suite (default: validation with --suite, else the training scenarios)")
    p.add_argument("--val-seeds", default=None, help="comma-separated twin seeds of the validation episodes "
                   f"(default: val_seeds in {DEFAULTS})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"MAPPO environment ticks over all env copies (default: total_steps in {DEFAULTS})")
    p.add_argument("--seed", type=int, default=None, help=f"default: seed in {DEFAULTS}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/marl", help="output folder (default runs/marl)")
    p.add_argument("--resume", default="", help="checkpoint.pt to resume from")
    p.add_argument("--envs", type=int, default=None, help=f"env copies stepped together (default: num_envs in {DEFAULTS})")
    p.add_argument("--teacher", default=None, help="policies imitated in the warm start, comma-separated: teachers of "
                   "agents.teachers or baselines; with several, each scenario is labelled by the best on it "
                   f"(default: teacher in {DEFAULTS}); '' skips it")
    p.add_argument("--teacher-table", default=None,
                   help="JSON of benchmarks/marl_teachers_by_pool.py: each scenario's best teacher read from it")
    p.add_argument("--bc-rounds", type=int, default=None, help=f"default: bc_rounds in {DEFAULTS}")
    p.add_argument("--bc-episodes", type=int, default=None, help=f"default: bc_episodes in {DEFAULTS}")
    p.add_argument("--hours", type=float, default=None, help="episode length in simulated hours (default: scenario's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"any other training setting (a field of {DEFAULTS}, e.g. credit=0.5); repeatable")
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict:
    """FIELD=VALUE pairs of `--set` as Args fields of the right type (a one-line error otherwise)."""
    import dataclasses

    from agents.mappo import Args
    from cncbrain.errors import UsageError

    fields = {f.name: f for f in dataclasses.fields(Args) if f.name not in ("extra",)}
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = type(getattr(Args(), name))
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[name] = value.lower() in ("true", "1")
            elif getattr(Args(), name) is None:
                out[name] = float(value)
            else:
                out[name] = kind(value)
        except ValueError:
            raise UsageError(f"--set {item!r}: {value!r} is not a {kind.__name__}") from None
    return out


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from agents.mappo import Args, train
    from cncbrain.errors import CncError

    if args.suite and args.scenario:
        raise CncError("give --scenario or --suite, not both")
    scenarios = f"suite:{args.suite}" if args.suite else (args.scenario or "abilene")
    val = f"suite:{args.val_suite}" if args.val_suite else ("suite:validation" if args.suite else "")
    for spec in filter(None, (scenarios, val)):
        if spec.startswith("suite:"):
            from cncbrain.suites import suite

            suite(spec.removeprefix("suite:"))  # an unknown suite: the one-line error, before any work
    given = {"total_steps": args.steps, "seed": args.seed, "num_envs": args.envs, "teacher": args.teacher,
             "bc_rounds": args.bc_rounds, "bc_episodes": args.bc_episodes, "val_seeds": args.val_seeds,
             "teacher_table": args.teacher_table}
    given.update(_overrides(args.overrides))
    a = Args(scenarios=scenarios, val_scenarios=val, device=args.device, out=args.out, resume=args.resume,
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
            if not console.is_terminal:  # a log file: one plain line per event
                keys = ("round", "episodes", "of", "charts/score", "charts/val_score", "charts/bc_accuracy",
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
