"""Hand-written scheduling policies, the yardsticks for the learned agents.

All share the policy interface (`PoolView` → `Actions`). Each combines an autoscaler (how many
replicas a service needs) with a placement rule (where a replica or a training shard goes):

| policy        | autoscaler                                              | placement (replicas / shards)            |
|---------------|---------------------------------------------------------|------------------------------------------|
| random        | demand ÷ (replica capacity × 0.7)                       | a random site with room / random bids    |
| round-robin   | same                                                    | next site in turn / sites in turn        |
| least-loaded  | same                                                    | most free GPUs (Kubernetes-like spread)  |
| greedy        | same                                                    | nearest to uncovered demand / best fit   |
| kpa           | Knative KPA: 60 s stable window, 6 s panic window,      | greedy                                   |
|               | panic at 2× desired, scale-down ≤ 2× per step           |                                          |
| ray-serve     | Ray Serve: target ongoing requests per replica,         | least-loaded (SPREAD)                    |
|               | upscale delay 30 s, downscale delay 600 s               |                                          |
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from cncbrain.twin.view import Actions, PoolView

TARGET_UTIL = 0.7


class Policy:
    """Base class: `reset(seed)` before an episode, `act(view)` once per tick."""

    name = "policy"

    def reset(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, view: PoolView) -> Actions:  # pragma: no cover - interface
        raise NotImplementedError


class RuleBased(Policy):
    """An autoscaler plus a placement rule; subclasses override the parts that differ."""

    def reset(self, seed: int = 0) -> None:
        super().reset(seed)
        self.pointer = 0

    # --- the autoscaler: capacity (requests/s) each service should have --------------------
    def wanted_capacity(self, view: PoolView) -> np.ndarray:
        return view.demand_rps.sum(axis=0) / TARGET_UTIL

    def may_scale_down(self, view: PoolView, k: int) -> bool:
        return True

    # --- placement rules -------------------------------------------------------------------
    def pick_add(self, view: PoolView, k: int, room: np.ndarray, uncovered: np.ndarray) -> int:
        raise NotImplementedError

    def pick_remove(self, view: PoolView, k: int, have: np.ndarray) -> int:
        """Remove from the least-utilised site that has a replica."""
        load = np.where(have, view.load[:, k], np.inf)
        return int(np.argmin(load))

    def bids(self, view: PoolView, o: int) -> np.ndarray:
        raise NotImplementedError

    # --- the tick --------------------------------------------------------------------------
    def act(self, view: PoolView) -> Actions:
        S, K = view.n_sites, view.n_services
        delta = np.zeros((S, K), np.int64)
        free = self.free = view.free_gpus.copy()  # GPUs left after this tick's own additions
        want = self.wanted_capacity(view)
        for k, svc in enumerate(view.services):
            if not svc.active:
                continue
            have_cap = view.capacity_rps[:, k].copy()
            count = int(view.replicas[:, k].sum())
            uncovered = np.maximum(view.demand_rps[:, k] / TARGET_UTIL - have_cap, 0.0)
            # scale up until the capacity covers the wanted capacity (and min_replicas)
            while count < svc.max_replicas and (have_cap.sum() < want[k] or count < svc.min_replicas):
                room = view.site_up & ((svc.tp[None, :] > 0) & (free >= svc.tp[None, :])).any(axis=1)
                if not room.any():
                    break
                s = self.pick_add(view, k, room, uncovered)
                if s < 0:
                    break
                ok = (svc.tp > 0) & (free[s] >= svc.tp)
                g = int(np.argmax(np.where(ok, svc.mu, -1.0)))
                free[s, g] -= svc.tp[g]
                have_cap[s] += svc.mu[g]
                uncovered[s] = max(uncovered[s] - svc.mu[g], 0.0)
                delta[s, k] += 1
                count += 1
            # scale down by at most one replica per service per tick when clearly over-provisioned
            if count > svc.min_replicas and delta[:, k].sum() == 0 and self.may_scale_down(view, k):
                have = view.replicas[:, k] > 0
                per = have_cap.sum() / max(count, 1)
                if have.any() and have_cap.sum() - per >= want[k] * 1.1:
                    delta[self.pick_remove(view, k, have), k] -= 1
        accept = np.zeros((S, len(view.offers)))
        for o in range(len(view.offers)):
            accept[:, o] = np.where(view.site_up, self.bids(view, o), 0.0)
        return Actions(delta, accept, np.full((S, K), -1, np.int64))


def _shard_room(view: PoolView, o: int) -> np.ndarray:
    """[S] shards of offer `o` each site can host on one GPU type."""
    off = view.offers[o]
    per = np.where(off.fits[None, :], view.free_gpus // max(off.shard_gpus, 1), 0)
    return per.max(axis=1)


class RandomPolicy(RuleBased):
    name = "random"

    def pick_add(self, view, k, room, uncovered):
        return int(self.rng.choice(np.nonzero(room)[0]))

    def pick_remove(self, view, k, have):
        return int(self.rng.choice(np.nonzero(have)[0]))

    def bids(self, view, o):
        return self.rng.random(view.n_sites) * (_shard_room(view, o) > 0)


class RoundRobinPolicy(RuleBased):
    name = "round-robin"

    def pick_add(self, view, k, room, uncovered):
        S = view.n_sites
        for i in range(S):
            s = (self.pointer + i) % S
            if room[s]:
                self.pointer = s + 1
                return s
        return -1

    def bids(self, view, o):
        S = view.n_sites
        order = (np.arange(S) - self.pointer) % S  # sites from the pointer on, in turn
        self.pointer += 1
        return (S - order) * (_shard_room(view, o) > 0)


class LeastLoadedPolicy(RuleBased):
    """Kubernetes-like spread: the site with the largest share of free GPUs."""

    name = "least-loaded"

    def _free_share(self, view):
        free = getattr(self, "free", None)
        free = view.free_gpus if free is None or free.shape != view.free_gpus.shape else free
        return free.sum(axis=1) / np.maximum(view.total_gpus.sum(axis=1), 1)

    def pick_add(self, view, k, room, uncovered):
        share = np.where(room, self._free_share(view), -1.0)
        return int(np.argmax(share))

    def bids(self, view, o):
        return (self._free_share(view) + 1e-3) * (_shard_room(view, o) > 0)


class GreedyPolicy(RuleBased):
    """Latency-aware: a new replica goes to the feasible site nearest to the largest uncovered
    demand; a training gang goes to the fewest sites, best fit first (least room left over)."""

    name = "greedy"

    def pick_add(self, view, k, room, uncovered):
        if uncovered.sum() <= 0:
            uncovered = view.demand_rps[:, k] + view.population * 1e-6
        i = int(np.argmax(uncovered))
        lat = np.where(room, view.latency_s[i], np.inf)
        if not np.isfinite(lat).any():
            return -1
        return int(np.argmin(lat))

    def pick_remove(self, view, k, have):
        # the replica with least demand near it: lowest utilisation, farthest from demand as tie-break
        load = np.where(have, view.load[:, k] - 1e-3 * view.demand_rps[:, k], np.inf)
        return int(np.argmin(load))

    def bids(self, view, o):
        room = _shard_room(view, o)
        need = view.offers[o].n_shards
        whole = room >= need
        # sites that take the whole gang first, tightest fit first; otherwise the roomiest
        return np.where(whole, 1000.0 - (room - need), room.astype(float))


class KpaPolicy(GreedyPolicy):
    """Knative Pod Autoscaler: desired = observed concurrency ÷ (target concurrency × 0.7), the
    concurrency averaged over a 60 s stable window, or over a 6 s panic window (here: the last tick)
    when that asks for ≥ 2× the current replicas; no scale-down while panicking; scale-down limited
    to halving per step. Target concurrency of an LLM replica = its decode batch limit."""

    name = "kpa"
    stable_window_s = 60.0
    panic_threshold = 2.0

    def reset(self, seed: int = 0) -> None:
        super().reset(seed)
        self.history: deque = deque()
        self.panic_until = -1.0

    def wanted_capacity(self, view):
        demand = view.demand_rps.sum(axis=0)
        self.history.append((view.time_s, demand))
        while self.history and self.history[0][0] < view.time_s - self.stable_window_s + 1e-9:
            self.history.popleft()
        stable = np.mean([d for _, d in self.history], axis=0) if self.history else demand
        cap_now = view.capacity_rps.sum(axis=0)
        panic = demand / TARGET_UTIL >= self.panic_threshold * np.maximum(cap_now, 1e-9)
        if panic.any():
            self.panic_until = view.time_s + self.stable_window_s
        self.panicking = view.time_s < self.panic_until
        return np.where(panic, demand, stable) / TARGET_UTIL

    def may_scale_down(self, view, k):
        return not self.panicking


class RayServePolicy(LeastLoadedPolicy):
    """Ray Serve autoscaling: desired = total ongoing requests on the replicas ÷
    target_ongoing_requests per replica (here half the replica's decode batch), over the last tick
    (its 30 s look-back); scale up only
    after the wish persists for upscale_delay_s = 30 s, down after downscale_delay_s = 600 s.
    Replicas are spread (SPREAD placement, least-loaded)."""

    name = "ray-serve"
    upscale_delay_s = 30.0
    downscale_delay_s = 600.0
    target_share_of_batch = 0.5

    def reset(self, seed: int = 0) -> None:
        super().reset(seed)
        self.up_since: dict[int, float] = {}
        self.down_since: dict[int, float] = {}
        self.target: dict[int, float] = {}

    def wanted_capacity(self, view):
        want = np.zeros(view.n_services)
        for k, svc in enumerate(view.services):
            best = int(np.argmax(svc.mu))
            cur = int(view.replicas[:, k].sum())
            ready = view.ready[:, k]
            if ready.sum() > 0:
                # ongoing requests, measured on the replicas as Ray does: a replica at utilisation ρ
                # holds ρ × its batch limit (more when it queues); in units of one replica's batch
                ongoing = float((view.load[:, k] * ready).sum())
            else:  # nothing serves yet: the demand, as if on the best GPU type
                ongoing = view.demand_rps[:, k].sum() / max(svc.mu[best], 1e-9)
            desired = math.ceil(ongoing / self.target_share_of_batch)
            now = view.time_s
            if desired > cur:
                self.down_since.pop(k, None)
                self.up_since.setdefault(k, now)
                if now - self.up_since[k] >= self.upscale_delay_s - 1e-9:
                    self.target[k] = desired
            elif desired < cur:
                self.up_since.pop(k, None)
                self.down_since.setdefault(k, now)
                if now - self.down_since[k] >= self.downscale_delay_s - 1e-9:
                    self.target[k] = desired
            else:
                self.up_since.pop(k, None)
                self.down_since.pop(k, None)
            target = self.target.get(k, max(desired, svc.min_replicas) if cur == 0 else cur)
            # replicas → capacity, at the mean capacity of the replicas the service has now
            per = view.capacity_rps[:, k].sum() / cur if cur else svc.mu[best]
            want[k] = target * per
        return want

    def may_scale_down(self, view, k):
        return k in self.down_since and view.time_s - self.down_since[k] >= self.downscale_delay_s - 1e-9


BASELINES = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, GreedyPolicy, KpaPolicy, RayServePolicy)
}
