"""Which hand rule wins on which pool: every teacher (and ray-serve) on every scenario of a suite,
with what the pool looks like, as one JSON (`--out`) and a table per family.

    python benchmarks/marl_teachers_by_pool.py --suite train --out runs/teachers_train.json [--workers 2]
    # more columns into the same table; the built-ins on training seeds no evaluation uses
    python benchmarks/marl_teachers_by_pool.py --suite train --policies ray-serve --add-to runs/teachers_train.json --out …
    python benchmarks/marl_teachers_by_pool.py --scenarios abilene,geant,att --seeds 9000,9001 --add-to … --out …

The JSON is what `cncbrain train --teacher-table FILE` reads to label each training scenario with
its best teacher (without it, the trainer plays each teacher once per scenario itself). It also
answers why `pack` wins on some pools and spreading on others (docs/marl.md): per scenario the
training load, the share of GPUs that can hold training shards, the pool size, the spread of the
demand and the latency to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TEACHERS = ("greedy", "kpa", "least-loaded", "teacher:pack", "teacher:kpack")


def pool_facts(key: str) -> dict:
    """What a pool looks like (from its scenario and the twin at time 0)."""
    from cncbrain.scenario import load_scenario
    from cncbrain.twin import costmodel
    from cncbrain.twin.sim import Twin

    sc = load_scenario(key)
    tw = Twin(sc, sc.seed)
    total = tw.total.sum()
    big = np.array([costmodel.gpu(g).mem_gb >= 70 for g in tw.gpu_types])
    demand_gpus = sum(j.spec.n_shards * j.spec.shard_gpus * min(j.spec.ideal_runtime_s, 3600 - j.spec.arrival_s)
                      for j in tw.jobs if j.spec.arrival_s < 3600) / 3600.0
    pop = tw.pool.population
    lat = np.where(np.isfinite(tw.latency), tw.latency, np.nan)
    return {"sites": int(tw.S), "services": len(sc.inference), "gpus": int(total),
            "big_gpu_share": float(tw.total[:, big].sum() / max(total, 1)),
            "training_gpu_share": float(demand_gpus / max(total, 1)), "jobs": len(tw.jobs),
            "failures": len(sc.failures), "ingress_top10_share": float(np.sort(pop)[::-1][:max(1, tw.S // 10)].sum()),
            "mean_latency_ms": float(np.nanmean(lat) * 1e3)}


METRICS = ("score", "slo_attainment", "training_goodput", "cost_usd", "ttft_p99_s")


def run(key: str, policies: tuple[str, ...], seeds: tuple[int, ...] = ()) -> dict:
    """Each policy's metrics on scenario `key`: on its own seed, or the mean over `seeds`."""
    from cncbrain.evaluate import run_policy
    from cncbrain.scenario import load_scenario

    sc = load_scenario(key)
    out = {"scenario": key, **pool_facts(key), "scores": {}}
    if seeds:
        out["seeds"] = list(seeds)
    for p in policies:
        ms = [run_policy(sc, p, s).metrics for s in (seeds or (sc.seed,))]
        out["scores"][p] = {k: float(np.mean([m[k] for m in ms])) for k in METRICS}
    return out


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """`old`'s rows with `new`'s scores added (a policy in both: `new`'s), and `new`'s other rows
    appended; each row's `best` recomputed over all its columns."""
    rows = {r["scenario"]: dict(r, scores=dict(r["scores"])) for r in old}
    for r in new:
        if r["scenario"] in rows and rows[r["scenario"]].get("seeds") == r.get("seeds"):
            rows[r["scenario"]]["scores"].update(r["scores"])
        elif r["scenario"] in rows:
            raise SystemExit(f"{r['scenario']}: seeds {r.get('seeds')} differ from the table's {rows[r['scenario']].get('seeds')}")
        else:
            rows[r["scenario"]] = r
    out = list(rows.values())
    for r in out:
        r["best"] = max(r["scores"], key=lambda p: r["scores"][p]["score"])
    return out


def main(argv: list[str] | None = None) -> None:
    from cncbrain.suites import members

    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="train")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names or paths instead of the suite")
    ap.add_argument("--seeds", default="", help="twin seeds, comma-separated (scores are their mean); "
                    "default: each scenario's own seed. Built-ins: seeds no evaluation uses (evaluation: 0-2)")
    ap.add_argument("--policies", default=",".join(TEACHERS))
    ap.add_argument("--add-to", default="", help="a table of this script to add these columns and rows to")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    keys = ([k for k in a.scenarios.split(",") if k] if a.scenarios
            else [f"family:{f}:{s}" for f, s in members(a.suite)])
    policies = tuple(p for p in a.policies.split(",") if p)
    seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
    old = json.loads(Path(a.add_to).read_text()) if a.add_to else None
    t0 = time.time()
    rows = []
    with ProcessPoolExecutor(max(a.workers, 1), mp_context=get_context("spawn")) as ex:
        for r in ex.map(run, keys, [policies] * len(keys), [seeds] * len(keys)):
            rows.append(r)
            print(r["scenario"], {p: round(v["score"], 3) for p, v in r["scores"].items()}, flush=True)
    wall = round(time.time() - t0, 1)
    this_run = {"scenarios": keys if a.scenarios else f"suite:{a.suite}", "seeds": list(seeds) or "own",
                "policies": list(policies), "wall_s": wall, "load_avg_1m": os.getloadavg()[0]}
    runs = [this_run]
    if old is not None:  # what made the old table, then this run
        runs = old.get("runs") or [{"scenarios": f"suite:{old.get('suite')}", "seeds": "own", "policies": old["policies"],
                                    "wall_s": old.get("wall_s"), "load_avg_1m": old.get("load_avg_1m")}]
        runs = [*runs, this_run]
        policies = tuple(dict.fromkeys([*old["policies"], *policies]))
    rows = merge(old["scenarios"] if old is not None else [], rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"suite": (old or {}).get("suite", a.suite), "policies": policies, "wall_s": wall,
                                       "load_avg_1m": os.getloadavg()[0], "runs": runs, "scenarios": rows}, indent=1))
    fams = sorted({r["scenario"].split(":")[1] if r["scenario"].startswith("family:") else "built-in" for r in rows})
    print(f"{'family':12s} " + " ".join(f"{p.removeprefix('teacher:'):>8s}" for p in policies) + "   wins")
    for f in fams:
        rs = [r for r in rows if (r["scenario"].split(":")[1] if r["scenario"].startswith("family:") else "built-in") == f]
        means = [np.mean([r["scores"][p]["score"] for r in rs if p in r["scores"]]) for p in policies]
        wins = {p: sum(r["best"] == p for r in rs) for p in policies}
        print(f"{f:12s} " + " ".join(f"{m:8.3f}" for m in means) + "   " +
              ", ".join(f"{p.removeprefix('teacher:')} {n}" for p, n in wins.items() if n))


if __name__ == "__main__":
    main()
