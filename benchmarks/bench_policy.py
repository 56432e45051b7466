"""Decision latency of the shipped MARL policy on CPU (numpy, no torch): one site's decision
(`MarlPolicy.decide_site`, what the live site agent calls) and the whole pool's (`act`).

    python benchmarks/bench_policy.py [--scenario geant] [--n 2000] [--json]

Target (issue 3): p99 ≤ 1 ms per site decision. The views are real twin states along an episode.
Reported twice: wall-clock and the process's CPU time per decision (`*_cpu_*`); on a shared machine
the wall-clock tail mostly measures waiting for a core, the CPU time what the decision costs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from agents.runtime import MarlPolicy
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="abilene")
    ap.add_argument("--policy", default=None, help="policy .npz (default: the shipped one)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    p = MarlPolicy(a.policy)
    load_ms = (time.perf_counter() - t0) * 1e3
    twin = Twin(load_scenario(a.scenario), seed=0)
    views = []
    while not twin.done() and len(views) < 40:
        v = twin.view()
        views.append(v)
        twin.step(p.act(v))
    p.decide_site(views[0], 0)  # warm the featurizer cache
    site, pool, site_cpu = [], [], []
    for i in range(a.n):
        v = views[i % len(views)]
        c0, t0 = time.process_time(), time.perf_counter()
        p.decide_site(v, i % v.n_sites)
        site.append(time.perf_counter() - t0)
        site_cpu.append(time.process_time() - c0)
    for i in range(min(a.n, 400)):
        v = views[i % len(views)]
        t0 = time.perf_counter()
        p.act(v)
        pool.append(time.perf_counter() - t0)
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 4)  # noqa: E731
    res = {"scenario": a.scenario, "sites": views[0].n_sites, "policy_load_ms": round(load_ms, 2),
           "site_decision_p50_ms": ms(site, 50), "site_decision_p99_ms": ms(site, 99),
           "site_decision_cpu_p50_ms": ms(site_cpu, 50), "site_decision_cpu_p99_ms": ms(site_cpu, 99),
           "pool_decision_p50_ms": ms(pool, 50), "pool_decision_p99_ms": ms(pool, 99),
           "load_avg_1m": os.getloadavg()[0]}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()
