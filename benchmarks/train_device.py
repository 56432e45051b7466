"""MAPPO training speed on CPU vs CUDA, same code and settings, in one run; prints one JSON object.

    PYTHONPATH=. python3 benchmarks/train_device.py [--updates 3] [--out DIR]

For each configuration — `small` (the shipped setting: 4 env copies, 2×64 MLP) and `large`
(16 copies, 2×256 MLP, 8 epochs: where a GPU could pay off) — and each device (cpu, and cuda when
torch sees one), it runs `--updates` MAPPO updates on abilene without the warm start and reports
environment ticks/s of the whole loop, and the seconds per update spent collecting (twin + actor
forward) and training (GAE + PPO epochs). The first update of each run is a warm-up and is not
counted. The twin always runs on the CPU; only the networks move. Finishes in well under 4 minutes
on a 16-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.mappo import Trainer  # noqa: E402
from agents.train_args import Args  # noqa: E402

CONFIGS = {
    "small": dict(num_envs=4, hidden=64, update_epochs=4, num_minibatches=4),
    "large": dict(num_envs=16, hidden=256, update_epochs=8, num_minibatches=4),
}


def measure(config: str, device: str, updates: int, out: str) -> dict:
    args = Args(total_steps=10**9, teacher="", eval_every=0, val_seeds="", device=device, out=out,
                anneal_lr=False, **CONFIGS[config])
    tr = Trainer(args)
    rows: list[dict] = []
    tr.log = lambda row, cb=None: rows.append(row)  # no CSV/plot work inside the timing
    tr.save = lambda out: None
    tr.consider_best = lambda out, cb=None: None
    ticks_per_update = args.num_envs * args.rollout_ticks
    tr.args.total_steps = ticks_per_update * (updates + 1)
    t0 = time.time()
    tr.train()
    wall = time.time() - t0
    timed = [r for r in rows if r.get("phase") == "mappo"][1:]
    collect = sum(r["perf/collect_s"] for r in timed)
    train = sum(r["perf/train_s"] for r in timed)
    batch = ticks_per_update * tr.team.n // args.num_envs
    return {
        "config": config, "device": device, "updates_timed": len(timed), "wall_s_all": round(wall, 2),
        "ticks_per_s": round(len(timed) * ticks_per_update / (collect + train), 1),
        "collect_s_per_update": round(collect / len(timed), 3),
        "train_s_per_update": round(train / len(timed), 3),
        "train_samples_per_s": round(len(timed) * batch * args.update_epochs / train),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--configs", default="small,large")
    a = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "load_avg_1m": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs.split(","):
            for device in devices:
                res["runs"].append(measure(config, device, a.updates, tmp))
                print(json.dumps(res["runs"][-1]), file=sys.stderr, flush=True)
    for config in a.configs.split(","):
        by = {r["device"]: r for r in res["runs"] if r["config"] == config}
        if "cuda" in by:
            res[f"speedup_{config}_ticks_per_s"] = round(by["cuda"]["ticks_per_s"] / by["cpu"]["ticks_per_s"], 2)
            res[f"speedup_{config}_train_step"] = round(by["cpu"]["train_s_per_update"] / by["cuda"]["train_s_per_update"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
