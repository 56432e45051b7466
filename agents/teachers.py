"""Hand-written expert rules that the MARL warm start imitates (`cncbrain train --teacher NAME`).

A teacher is a training aid, not a baseline: it decides for the whole pool (it sees every site),
and the per-site actors learn to reproduce its choices from their own local observation (the
centralised-expert → decentralised-policy step of CTDE). Teachers are policies behind the same
interface as the baselines, so `cncbrain eval --policy teacher:pack` measures one like any policy
and docs/marl.md reports it next to the learned policy.

`pack` was written after measuring where the baselines lose training goodput on the twin
(docs/marl.md, "Why a packing teacher"): replicas spread over every site (Ray Serve's SPREAD,
Kubernetes' least-loaded) leave a few GPUs used at every site, and the gangs of 2–4-GPU training
shards that need 80 GB cards then fit nowhere and block the queue. `pack` keeps Ray Serve's
autoscaler (how many replicas) but packs them into the sites that already run the most replicas,
and bids for training gangs like the greedy baseline (whole gang on one site, tightest fit).
"""

from __future__ import annotations

import numpy as np

from cncbrain.policies.baselines import GreedyPolicy, KpaPolicy, Policy, RayServePolicy
from cncbrain.twin.view import PoolView


class PackTeacher(RayServePolicy):
    """Ray Serve's autoscaler; replicas packed into the sites that already run the most replicas
    (ties: the most free GPUs); training gangs bid for as the greedy baseline does."""

    name = "pack"

    def pick_add(self, view: PoolView, k: int, room: np.ndarray, uncovered: np.ndarray) -> int:
        free = self.free.sum(axis=1)  # GPUs left after this tick's own additions
        key = view.replicas.sum(axis=1) + free / (1.0 + free.max())
        return int(np.argmax(np.where(room, key, -1.0)))

    def bids(self, view: PoolView, o: int) -> np.ndarray:
        return GreedyPolicy.bids(self, view, o)


class SpreadTeacher(RayServePolicy):
    """Ray Serve as it is (autoscaler, SPREAD placement) but bidding for training gangs as the
    greedy baseline does (whole gang on one site, tightest fit): the spread end of the teachers."""

    name = "spread"

    def bids(self, view: PoolView, o: int) -> np.ndarray:
        return GreedyPolicy.bids(self, view, o)


class NearTeacher(RayServePolicy):
    """Ray Serve's autoscaler; each replica at the site with room nearest to the largest uncovered
    demand (the greedy baseline's placement); greedy bids."""

    name = "near"

    def pick_add(self, view: PoolView, k: int, room: np.ndarray, uncovered: np.ndarray) -> int:
        return GreedyPolicy.pick_add(self, view, k, room, uncovered)

    def bids(self, view: PoolView, o: int) -> np.ndarray:
        return GreedyPolicy.bids(self, view, o)


class KpaPackTeacher(KpaPolicy):
    """The Knative autoscaler of `kpa` (how many replicas) with `pack`'s placement (into the sites
    that already run the most replicas); greedy bids."""

    name = "kpack"

    def pick_add(self, view: PoolView, k: int, room: np.ndarray, uncovered: np.ndarray) -> int:
        return PackTeacher.pick_add(self, view, k, room, uncovered)


TEACHERS: dict[str, type[Policy]] = {t.name: t for t in (PackTeacher, SpreadTeacher, NearTeacher, KpaPackTeacher)}

