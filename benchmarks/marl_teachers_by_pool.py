"""Which hand rule wins on which pool: every teacher (and ray-serve) on every scenario of a suite,
with what the pool looks like, as one JSON (`--out`) and a table per family.

    python benchmarks/marl_teachers_by_pool.py --suite train --out runs/teachers_train.json [--workers 2]

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


def run(key: str, policies: tuple[str, ...]) -> dict:
    from cncbrain.evaluate import run_policy
    from cncbrain.scenario import load_scenario

    sc = load_scenario(key)
    out = {"scenario": key, **pool_facts(key), "scores": {}}
    for p in policies:
        m = run_policy(sc, p, sc.seed).metrics
        out["scores"][p] = {k: m[k] for k in ("score", "slo_attainment", "training_goodput", "cost_usd", "ttft_p99_s")}
    return out


def main(argv: list[str] | None = None) -> None:
    from cncbrain.suites import members

    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="train")
    ap.add_argument("--policies", default=",".join(TEACHERS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    keys = [f"family:{f}:{s}" for f, s in members(a.suite)]
    policies = tuple(p for p in a.policies.split(",") if p)
    t0 = time.time()
    rows = []
    with ProcessPoolExecutor(max(a.workers, 1), mp_context=get_context("spawn")) as ex:
        for r in ex.map(run, keys, [policies] * len(keys)):
            rows.append(r)
            print(r["scenario"], {p: round(v["score"], 3) for p, v in r["scores"].items()}, flush=True)
    for r in rows:
        r["best"] = max(r["scores"], key=lambda p: r["scores"][p]["score"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"suite": a.suite, "policies": policies, "wall_s": round(time.time() - t0, 1),
                                       "load_avg_1m": os.getloadavg()[0], "scenarios": rows}, indent=1))
    fams = sorted({r["scenario"].split(":")[1] for r in rows})
    print(f"{'family':12s} " + " ".join(f"{p.removeprefix('teacher:'):>8s}" for p in policies) + "   wins")
    for f in fams:
        rs = [r for r in rows if r["scenario"].split(":")[1] == f]
        means = [np.mean([r["scores"][p]["score"] for r in rs]) for p in policies]
        wins = {p: sum(r["best"] == p for r in rs) for p in policies}
        print(f"{f:12s} " + " ".join(f"{m:8.3f}" for m in means) + "   " +
              ", ".join(f"{p.removeprefix('teacher:')} {n}" for p, n in wins.items() if n))


if __name__ == "__main__":
    main()
