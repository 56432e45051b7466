"""The coordination step of the learned policy (`cncbrain.coordination`, docs/marl.md
"Coordination") and the variants it was chosen among, on a suite (default `validation`, where it
was selected): one episode per scenario on its own seed, as `cncbrain eval --suite` runs them.

    python benchmarks/marl_coordination_variants.py [--suite validation] [--policy agents/policies/marl_v2.npz]
        [--workers 2] [--json runs/coordination_variants.json]
    python benchmarks/marl_coordination_variants.py --suite train --family overload --variants 0,1,9,10
    python benchmarks/marl_coordination_variants.py --herd att,abilene,geant,family:zoo:2003

`--herd`: the herd itself — on each scenario (seed 0), the tick of the first 12 where the
uncoordinated policy adds the most replicas beyond what the pool's deficit calls for (⌈uncovered
demand ÷ the best site's rate of one more replica⌉ per service, summed), its adds there, and the
coordinated policy's adds on the same view.

Rows: the policy's weights without coordination (what marl_v2 does), the shipped coordination
(adds within the pool's deficit, ordered by confidence and latency to the demand; removals not
while adding or starting), the same ordered by confidence alone or by latency alone, with the
rules' scale-down (one removal per service and tick, only above demand ÷ 0.7 × 1.1), with one
removal per tick, with removals only above demand ÷ 0.7, a target utilisation of 0.6 and 0.8,
removals never held (only `min_replicas` bounds them), and removals free while a service's demand
is not covered (the overloaded pools). Columns: the mean score, how many scenarios are more than 0.02 below their best baseline (the
stored baselines of docs/marl_suite_<suite>.json), and the mean per family.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from agents.runtime import Coordination, MarlPolicy
from cncbrain.scenario import generate
from cncbrain.suite_eval import BASELINE_POLICIES
from cncbrain.suites import members
from cncbrain.twin.sim import Twin

VARIANTS: dict[str, Coordination | None] = {
    "none (the weights alone)": None,
    "shipped: deficit, confidence + latency": Coordination(),
    "ordered by confidence alone": Coordination(priority="margin"),
    "ordered by latency alone": Coordination(priority="latency"),
    "+ rules' scale-down (1 per tick, ≥ 1.1 × wanted)": Coordination(max_removals=1, remove_margin=1.1),
    "+ 1 removal per tick": Coordination(max_removals=1),
    "+ removals only above wanted": Coordination(remove_margin=1.0),
    "target utilisation 0.6": Coordination(target_util=0.6),
    "target utilisation 0.8": Coordination(target_util=0.8),
    "removals not held (only min_replicas)": Coordination(hold=False),
    "removals free while demand is uncovered": Coordination(free_uncovered=True),
}


def _episode(args: tuple[str, int, str, str]) -> tuple[str, int, float]:
    name, index, policy, variant = args
    family, seed = members(name)[index]
    scenario = generate(family, seed)
    p = MarlPolicy(policy, coordination=VARIANTS[variant])
    if VARIANTS[variant] is None:
        p.coordination = None
    p.reset(scenario.seed)
    twin = Twin(scenario, seed=scenario.seed)
    while not twin.done():
        twin.step(p.act(twin.view()))
    return variant, index, float(twin.metrics()["score"])


def herd(names: list[str], policy: str) -> None:
    from agents.runtime import pool_of
    from cncbrain.scenario import load_scenario

    table = Table(title=f"the herd of {policy}: the worst of the first 12 ticks (seed 0)")
    for col in ("scenario", "sites", "tick", "replicas the deficit calls for", "added, uncoordinated",
                "sites adding", "added, coordinated"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for name in names:
        twin = Twin(load_scenario(name), seed=0)
        alone = MarlPolicy(policy)
        alone.coordination = None
        joint = MarlPolicy(policy, coordination=Coordination())
        worst = None
        for t in range(12):
            view = twin.view()
            p = pool_of(view)
            room = view.capacity_per_replica().max(axis=0)
            need = int(np.ceil(np.maximum(p.demand / 0.7 - p.capacity, 0) / np.maximum(room, 1e-9)).sum())
            d = alone.act(view).replica_delta
            j = joint.act(view).replica_delta
            row = (int(np.maximum(d, 0).sum()) - need, t, need, int(np.maximum(d, 0).sum()), int((d > 0).any(axis=1).sum()),
                   int(np.maximum(j, 0).sum()))
            worst = row if worst is None or row[0] > worst[0] else worst
            twin.step(alone.act(view))
        assert worst is not None
        table.add_row(name, str(twin.S), *(str(x) for x in worst[1:]))
    Console(width=200).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="validation")
    ap.add_argument("--policy", default="agents/policies/marl_v2.npz", help="policy file (its weights)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--family", help="only the suite's scenarios of this family")
    ap.add_argument("--variants", help="comma-separated indices of the variants to run (default: all)")
    ap.add_argument("--json", help="write the scores per variant and scenario here")
    ap.add_argument("--herd", help="comma-separated scenarios: measure the herd instead (see above)")
    a = ap.parse_args()
    if a.herd:
        herd(a.herd.split(","), a.policy)
        return
    every = members(a.suite)
    index = [i for i, (fam, _) in enumerate(every) if a.family in (None, fam)]
    keys = [every[i] for i in index]
    stored_path = Path(f"docs/marl_suite_{a.suite}.json")
    best = {}
    if stored_path.exists():  # the stored baselines: how many scenarios are far below their best
        stored = json.loads(stored_path.read_text())
        best = {s["name"]: max(s["policies"][b]["score"] for b in BASELINE_POLICIES if b in s["policies"])
                for s in stored["scenarios"]}
    names = [f"{fam}-{seed}" for fam, seed in keys]
    variants = list(VARIANTS)
    if a.variants:
        variants = [variants[int(i)] for i in a.variants.split(",")]
    jobs = [(a.suite, i, a.policy, v) for v in variants for i in index]
    scores: dict[str, np.ndarray] = {v: np.full(len(keys), np.nan) for v in variants}
    where = {i: n for n, i in enumerate(index)}
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn")) as pool:
        for variant, i, score in pool.map(_episode, jobs):
            scores[variant][where[i]] = score
    families = list(dict.fromkeys(fam for fam, _ in keys))
    table = Table(title=f"coordination variants of {a.policy} on {a.suite} (one episode per scenario)")
    for col in ("variant", "mean", "> 0.02 below best baseline", *families):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v, s in scores.items():
        below = sum(s[i] < best[n] - 0.02 for i, n in enumerate(names)) if best else "—"
        fam = [np.mean([s[i] for i, (f, _) in enumerate(keys) if f == family]) for family in families]
        table.add_row(v, f"{s.mean():.4f}", str(below), *(f"{x:.3f}" for x in fam))
    Console(width=200).print(table)
    if a.json:
        Path(a.json).write_text(json.dumps({v: dict(zip(names, s.tolist(), strict=True)) for v, s in scores.items()},
                                           indent=1))


if __name__ == "__main__":
    main()
