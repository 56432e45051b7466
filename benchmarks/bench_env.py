"""Speed of the MARL environment: agent-steps per second on one core, random (unmasked) actions,
through the PettingZoo parallel API and through the trainer's array API.

    python benchmarks/bench_env.py [--scenario abilene] [--episodes 3] [--json]

Target: ≥ 2,000 agent-steps/s on abilene. Pin to one core with `taskset -c 0` to measure
"one core"; the figure depends on what else the machine runs (the load is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from agents.cnc_pool_v0 import parallel_env


def bench(scenario: str, episodes: int, api: str) -> float:
    env = parallel_env(scenario=scenario)
    rng = np.random.default_rng(0)
    nv = env.featurizer.nvec
    steps, wall = 0, 0.0
    for ep in range(episodes):
        if api == "parallel":
            env.reset(seed=ep)
            t0 = time.perf_counter()
            while env.agents:
                choice = rng.integers(0, nv, size=(len(env.agents), len(nv)))
                env.step({a: choice[i] for i, a in enumerate(env.agents)})
                steps += env.n_agents
        else:
            env.reset_arrays(ep)
            t0 = time.perf_counter()
            done = False
            while not done:
                *_, done = env.step_arrays(rng.integers(0, nv, size=(env.n_agents, len(nv))))
                steps += env.n_agents
        wall += time.perf_counter() - t0
    return steps / wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="abilene")
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = {"scenario": a.scenario, "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    for api in ("parallel", "arrays"):
        res[f"agent_steps_per_s_{api}"] = round(bench(a.scenario, a.episodes, api))
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
