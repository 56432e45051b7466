"""The twin and the oracle at 300 sites: wall time and peak memory of building the pool, one
simulated hour under two baselines, and the oracle's LP, on a generated 300-site continental pool
(`family:continental:49`), each in a fresh process so its peak memory is its own.

Run: `python -m benchmarks scale` (or `python benchmarks/bench_scale.py --scenario family:…`).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from multiprocessing import get_context

SCENARIO = "family:continental:49"


def _measure(key: str, what: str, queue) -> None:
    import logging

    logging.disable(logging.WARNING)
    from cncbrain.evaluate import run_policy
    from cncbrain.scenario import load_scenario
    from cncbrain.twin.sim import Twin

    sc = load_scenario(key)
    t0 = time.perf_counter()
    if what == "build":
        twin = Twin(sc, seed=sc.seed)
        extra = f"{twin.S} sites, {twin.K} services, {sum(len(s.t) for s in twin.services):,} simulated requests, " \
                f"{len(twin.jobs)} jobs, {int(twin.total.sum()):,} GPUs"
        score = float("nan")
    else:
        r = run_policy(sc, what, sc.seed)
        score, extra = r.metrics["score"], ""
    wall = time.perf_counter() - t0
    queue.put((wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, score, extra))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=SCENARIO)
    ap.add_argument("--policies", default="least-loaded,greedy,oracle")
    args = ap.parse_args(argv)
    ctx = get_context("spawn")
    print(f"{args.scenario}; load average {os.getloadavg()[0]:.1f} (2-core machine shared with other work)")
    for what in ["build", *args.policies.split(",")]:
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(args.scenario, what, q))
        p.start()
        wall, rss, score, extra = q.get()
        p.join()
        label = "build the twin" if what == "build" else f"1 h under {what}" if what != "oracle" else "oracle LP"
        tail = extra if what == "build" else f"score {score:.3f}"
        print(f"  {label:24s} {wall:7.1f} s wall, peak {rss:6.0f} MB  {tail}", flush=True)


if __name__ == "__main__":
    main()
