"""An honesty check for the MARL results (docs/marl.md): a hand-written rule that keeps one replica
of every service at every site with room (greedy bids) — what the learned policy mostly does.
Not a baseline of `cncbrain eval`; printed for comparison only.

    python benchmarks/marl_spread_check.py abilene,geant,att
"""

from __future__ import annotations

import sys

import numpy as np

from cncbrain.policies.baselines import GreedyPolicy
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin
from cncbrain.twin.view import Actions


class Spread(GreedyPolicy):
    """One replica of every service at every up site with room; greedy bids; never scales down."""

    name = "spread"

    def act(self, view):
        S, K = view.n_sites, view.n_services
        delta = np.zeros((S, K), np.int64)
        room = view.capacity_per_replica() > 0
        delta[(view.replicas == 0) & room & view.site_up[:, None]] = 1
        acc = np.zeros((S, len(view.offers)))
        for o in range(len(view.offers)):
            acc[:, o] = np.where(view.site_up, self.bids(view, o), 0)
        return Actions(delta, acc, np.full((S, K), -1, np.int64))


def main() -> None:
    for scn in (sys.argv[1] if len(sys.argv) > 1 else "abilene,geant").split(","):
        sc = load_scenario(scn)
        rows = []
        for seed in range(5):
            tw = Twin(sc, seed)
            p = Spread()
            p.reset(seed)
            while not tw.done():
                tw.step(p.act(tw.view()))
            rows.append(tw.metrics())
        means = {k: round(float(np.mean([r[k] for r in rows])), 4)
                 for k in ["score", "slo_attainment", "training_goodput", "cost_usd"]}
        print(scn, "spread (seeds 0-4)", means)


if __name__ == "__main__":
    main()
