"""Coordination of the sites' replica wishes: one joint step over what the sites want this tick.

Site agents decide each from its own view. Where a service's demand rises, many of them see it and
each adds a replica in the same tick; the next tick, with several times the capacity the pool
needs, each removes its own again, often before it was ready (the herd: 23 of att's 25 sites
added a replica of the same service in one tick under `marl_v1`). The hand rules never herd: one
central loop adds until the pool's capacity covers its demand. `admit` is that loop's budget,
applied to the sites' wishes, per service:

- **adds** are granted in order of priority (the highest first; ties by row) only while the pool's
  uncovered demand — demand ÷ `TARGET_UTIL` less the capacity of every replica, serving or
  starting — is not covered by the adds granted before it (the last one may overshoot; a wish of
  several replicas is cut to what the rest of the deficit needs), or while the pool is below
  `min_replicas`. A pool whose demand is covered gets no add at all this tick.
- **removals** are granted unless an add of the same service was granted this tick (no churn: a
  replica started at one site and stopped at another in the same tick) or one of its replicas is
  still starting (no removal on a figure that does not count the new replica's serving yet), and
  never below `min_replicas`.

Options, all off by default and measured worse on the validation suite (docs/marl.md,
benchmarks/marl_coordination_variants.py): `max_removals` (at most so many removals per service
and tick), `remove_margin` (only while the capacity left covers demand ÷ `TARGET_UTIL` × the
margin: the rules' scale-down), `hold=False` (removals not held by adds or starting replicas),
`free_uncovered` (removals of a service whose demand is not covered granted freely: on overloaded
pools the learned policy gives GPUs back to training by removing replicas the demand would want).

The one implementation, used twice: the twin's learned policy applies it to all its sites' choices
at once (`agents.runtime.MarlPolicy.act`, priority from the policy's logits and the latency to
the service's demand), and the live scheduler to the SCALE proposals the site agents send for one
snapshot (`services.scheduler.coordinator`, the same priorities carried in the proposals).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

TARGET_UTIL = 0.7
"""Utilisation at which a service's demand counts as covered (the autoscalers' target)."""


class Pool(NamedTuple):
    """What the pool holds of each of K services; rates in one unit (requests/s)."""

    demand: np.ndarray  # [K] demand arriving, pool-wide
    capacity: np.ndarray  # [K] capacity of the replicas serving or starting
    replicas: np.ndarray  # [K] replicas serving or starting
    starting: np.ndarray  # [K] replicas not serving yet
    min_replicas: np.ndarray  # [K]


def admit(delta: np.ndarray, priority: np.ndarray, room: np.ndarray, per_replica: np.ndarray, pool: Pool, *,
          target_util: float = TARGET_UTIL, max_removals: int | None = None,
          remove_margin: float | None = None, hold: bool = True, free_uncovered: bool = False) -> np.ndarray:
    """The granted part of the sites' wishes `delta` [N, K] (+n: add n replicas, −n: remove n, 0:
    keep) for K services: [N, K], each entry between 0 and the wish. `priority` [N, K]: who goes
    first (higher first, ties by row); `room` [N, K]: the capacity one more replica adds at each
    site (a wish to add where it is 0 is not granted); `per_replica` [N, K]: the capacity of one of
    the site's replicas (`pool`'s unit). `max_removals`: most replicas of one service removed per
    tick (None: no cap); `remove_margin`: a removal must leave demand ÷ `target_util` × this (None:
    no such floor); `hold`: no removal while an add of the service is granted or one of its replicas
    starts; `free_uncovered`: removals of a service whose demand is not covered are all granted."""
    delta = np.asarray(delta, np.int64)
    out = np.zeros_like(delta)
    N, K = delta.shape
    for j in range(K):
        col = delta[:, j]
        if not col.any():
            continue
        order = np.lexsort((np.arange(N), -np.asarray(priority[:, j], float)))
        left = float(pool.demand[j]) / target_util - float(pool.capacity[j])  # uncovered (< 0: spare)
        short = int(pool.min_replicas[j] - pool.replicas[j])  # replicas below min_replicas
        added = False
        for i in order:
            n, r = int(col[i]), float(room[i, j])
            if n <= 0 or r <= 0:
                continue
            grant = 0
            if left > 0:  # as many as cover the rest of the deficit (no division that overflows)
                grant = n if left >= n * r else min(n, math.ceil(left / r - 1e-9))
            grant = max(grant, min(n, short))
            if grant > 0:
                out[i, j] = grant
                left -= grant * r
                short -= grant
                added = True
        uncovered = float(pool.demand[j]) / target_util > float(pool.capacity[j])
        if free_uncovered and uncovered:
            out[:, j] = np.where(col < 0, col, out[:, j])
            continue
        if hold and (added or pool.starting[j] > 0):
            continue
        capacity, replicas, removed = float(pool.capacity[j]), int(pool.replicas[j]), 0
        floor = -math.inf if remove_margin is None else float(pool.demand[j]) / target_util * remove_margin
        cap = N * max(int(-col.min()), 1) if max_removals is None else max_removals
        for i in order:
            for _ in range(max(-int(col[i]), 0)):
                after = capacity - float(per_replica[i, j])
                if removed >= cap or replicas - 1 < pool.min_replicas[j] or after < floor:
                    break
                out[i, j] -= 1
                capacity, replicas, removed = after, replicas - 1, removed + 1
    return out
