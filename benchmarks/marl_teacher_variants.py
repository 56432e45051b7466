"""Where the baselines lose score, and the rule variants that led to the `pack` teacher
(docs/marl.md, "Why a packing teacher"). Hand rules over the twin, printed for comparison only —
none of them is a baseline of `cncbrain eval`.

    python benchmarks/marl_teacher_variants.py [--scenario abilene] [--seeds 0,1,2,3,4] [--frugal]

Rows: ray-serve as is; ray-serve with greedy gang bids; replicas on the GPU types least useful to
training (< 70 GB) with greedy bids; `pack`; `pack` scaling down from the sites with fewest
replicas; `pack` with its replica changes clipped to ±1 and to −1…+3 per site and tick (what a
per-site action head can express). `--frugal` adds ray-serve and kpa with replicas on a "frugal"
GPU type (least memory among the types with ≥ 30/50/70 % of the best speed).
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
from rich.console import Console
from rich.table import Table

from agents.catalog import make_policy
from agents.teachers import PackTeacher
from cncbrain.policies.baselines import GreedyPolicy, RayServePolicy
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


class RayServeGreedyBids(RayServePolicy):
    name = "ray-serve, greedy bids"

    def bids(self, view, o):
        return GreedyPolicy.bids(self, view, o)


class InferenceOnLightGpus(RayServeGreedyBids):
    """Replicas where most free GPUs have < 70 GB (of little use to the 7B/13B training shards)."""

    name = "replicas on < 70 GB GPUs, greedy bids"

    def pick_add(self, view, k, room, uncovered):
        light = np.array([m < 70 for m in self.mem_gb])
        weak = (self.free * light[None, :]).sum(axis=1)
        share = self.free.sum(axis=1) / np.maximum(view.total_gpus.sum(axis=1), 1)
        return int(np.argmax(np.where(room, weak + share, -1)))


class PackShrinkSmallest(PackTeacher):
    name = "pack, scale down from the smallest sites"

    def pick_remove(self, view, k, have):
        return int(np.argmin(np.where(have, view.replicas.sum(axis=1) + view.load[:, k], np.inf)))


class Clipped(PackTeacher):
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.name = f"pack, replica change clipped to {lo:+d}…{hi:+d} per site and tick"

    def act(self, view):
        a = super().act(view)
        a.replica_delta[:] = np.clip(a.replica_delta, self.lo, self.hi)
        return a


@contextlib.contextmanager
def frugal_typing(share: float):
    """The twin puts new replicas on the least-memory GPU type with ≥ `share` of the best speed."""
    original = Twin._best_type

    def best_type(self, k, free_s):
        svc = self.services[k]
        ok = (svc.tp > 0) & (free_s >= svc.tp)
        if not ok.any():
            return -1
        good = ok & (svc.mu >= share * np.where(ok, svc.mu, -1.0).max())
        mem = np.array([g.mem_gb for g in self.gpus])
        return int(np.argmin(np.where(good, mem * 1e6 - svc.mu, np.inf)))

    Twin._best_type = best_type
    try:
        yield
    finally:
        Twin._best_type = original


def run(scenario, make, seeds):
    rows = []
    for seed in seeds:
        tw = Twin(scenario, seed=seed)
        p = make()
        p.mem_gb = [g.mem_gb for g in tw.gpus]
        p.reset(seed)
        while not tw.done():
            tw.step(p.act(tw.view()))
        m = tw.metrics()
        rows.append((m["score"], m["slo_attainment"], m["training_goodput"]))
    return np.mean(rows, axis=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="abilene")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--frugal", action="store_true")
    a = ap.parse_args(argv)
    sc, seeds = load_scenario(a.scenario), [int(x) for x in a.seeds.split(",")]
    variants = [("ray-serve", lambda: make_policy("ray-serve")), ("ray-serve, greedy bids", RayServeGreedyBids),
                ("replicas on < 70 GB GPUs, greedy bids", InferenceOnLightGpus), ("pack", PackTeacher),
                ("pack, scale down from the smallest sites", PackShrinkSmallest),
                ("pack, replica change clipped to ±1", lambda: Clipped(-1, 1)),
                ("pack, replica change clipped to −1…+3", lambda: Clipped(-1, 3))]
    table = Table(title=f"{a.scenario}: mean over seeds {a.seeds}")
    for col in ("rule", "score", "slo_attainment", "training_goodput"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for name, make in variants:
        table.add_row(name, *(f"{x:.3f}" for x in run(sc, make, seeds)))
    if a.frugal:
        for share in (0.3, 0.5, 0.7):
            with frugal_typing(share):
                for base in ("ray-serve", "kpa"):
                    table.add_row(f"{base}, frugal GPU type (≥ {share:.0%} of best speed)",
                                  *(f"{x:.3f}" for x in run(sc, lambda b=base: make_policy(b), seeds)))
    Console().print(table)


if __name__ == "__main__":
    main()
