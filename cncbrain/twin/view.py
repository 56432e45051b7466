"""The policy interface: what a scheduling policy sees each control tick (`PoolView`) and what it
answers (`Actions`). The twin, the MARL environment and the live scheduler all speak it.

Arrays are indexed [site] or [site, service] (S sites, K services) or [site, gpu type] (G types).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ServiceInfo:
    name: str
    model: str
    ttft_slo_s: float
    tpot_slo_s: float
    min_replicas: int
    max_replicas: int
    tp: np.ndarray
    """[G] GPUs one replica needs on each type (0: does not fit)."""
    mu: np.ndarray
    """[G] requests/s one replica sustains on each type at full utilisation."""
    bmax: np.ndarray
    """[G] decode batch limit of one replica on each type."""
    active: bool = True

    def replica_room(self, free_gpus: np.ndarray) -> np.ndarray:
        """[rows] requests/s one more replica sustains on the best GPU type with room for it, at each
        row of `free_gpus` [rows, G] (0: no room)."""
        fit = (self.tp[None, :] > 0) & (free_gpus >= self.tp[None, :])
        return np.where(fit, self.mu[None, :], 0.0).max(axis=1)


@dataclass
class JobOffer:
    """A pending training job offered to the sites: a gang of `n_shards` shards of `shard_gpus`."""

    job_id: str
    n_shards: int
    shard_gpus: int
    fits: np.ndarray
    """[G] whether a shard's training state fits `shard_gpus` GPUs of each type."""
    waiting_s: float
    model: str


@dataclass
class PoolStats:
    """Pool-wide figures a site's policy reads besides its own site and its nearest neighbours —
    what the brain broadcasts (the twin computes them from the whole pool, a live agent from
    perception's snapshot). Sums per service (replicas, demand, capacity) are not here: a view's
    rows add up to them (a live view has a "rest of the pool" row)."""

    n_sites: int
    n_up: int
    gpus_total: float
    gpus_free: float
    gpus_training: float
    site_gpus_max: float
    """Most GPUs installed at one site."""
    site_replicas_max: float
    """Most replicas (all services) at one site."""
    service_replicas_max: np.ndarray
    """[K] most replicas of each service at one site."""
    service_sites: np.ndarray
    """[K] sites running at least one replica of each service."""
    pending_jobs: int = 0
    """Training jobs waiting for placement (the offers are the head of that queue)."""
    pending_gpus: float = 0.0
    """GPUs those jobs ask for."""
    site_free_share_max: float = 1.0
    """Largest share of free GPUs at one up site."""
    service_uncovered_max: np.ndarray | None = None
    """[K] the most uncovered demand (requests/s at 70 % utilisation beyond the capacity there) at one site."""
    focus_latency_s: np.ndarray | None = None
    """[S, K] one-way latency from each row of the view to the site where each service's demand is
    least covered (its "focus": the most uncovered demand, else the most demand)."""
    focus_nearest: np.ndarray | None = None
    """[S, K] whether each row is the site with room for a replica nearest to that focus."""

    @classmethod
    def of(cls, up: np.ndarray, total_gpus: np.ndarray, free_gpus: np.ndarray, training_gpus: np.ndarray,
           replicas: np.ndarray, pending_jobs: int = 0, pending_gpus: float = 0.0, demand_rps=None,
           capacity_rps=None, latency_s=None, tp=None, population=None) -> PoolStats:
        """From a whole pool's arrays ([S], [S, G], [S, G], [S], [S, K]; demand and capacity [S, K],
        latency [S, S], tp [K, G] GPUs per replica, population [S]: for the focus figures)."""
        site_total = total_gpus.sum(axis=1)
        K = replicas.shape[1]
        share = np.where(up, free_gpus.sum(axis=1) / np.maximum(site_total, 1), 0.0)
        out = cls(int(len(up)), int(up.sum()), float(site_total.sum()), float(free_gpus.sum()),
                  float(training_gpus.sum()), float(site_total.max(initial=0)),
                  float(replicas.sum(axis=1).max(initial=0)),
                  replicas.max(axis=0, initial=0).astype(float) if K else np.zeros(0),
                  (replicas > 0).sum(axis=0).astype(float) if K else np.zeros(0), pending_jobs, pending_gpus,
                  float(share.max(initial=0.0)))
        if demand_rps is not None and K:
            out.service_uncovered_max, out.focus_latency_s, out.focus_nearest = focus_figures(
                up, free_gpus, demand_rps, capacity_rps, latency_s, tp, population)
        return out


def focus_figures(up: np.ndarray, free_gpus: np.ndarray, demand_rps: np.ndarray, capacity_rps: np.ndarray,
                  latency_s: np.ndarray, tp: np.ndarray, population: np.ndarray | None = None):
    """Per service (columns of demand and capacity [S, K]): the most uncovered demand at one site
    [K], the latency from every site to the service's focus — the site with the most uncovered
    demand at 70 % utilisation, else the most demand — [S, K], and whether each site is the one with
    room for a replica (`tp` [K, G] GPUs per replica) nearest to that focus [S, K]."""
    S = len(up)
    uncovered = np.maximum(demand_rps / 0.7 - capacity_rps, 0.0)  # [S, K]
    lat = np.where(np.isfinite(latency_s), latency_s, 1e3)
    pop = np.zeros(S) if population is None else population
    focus = np.where(uncovered.max(axis=0) > 0, uncovered.argmax(axis=0),
                     (demand_rps + 1e-9 * pop[:, None]).argmax(axis=0))  # [K]
    room = ((tp[None] > 0) & (free_gpus[:, None, :] >= tp[None])).any(axis=2) & up[:, None]  # [S, K]
    far = np.where(room, lat[focus].T, np.inf)  # [S, K] latency from the focus, where a replica fits
    nearest = room & (np.arange(S)[:, None] == far.argmin(axis=0)[None, :])
    return uncovered.max(axis=0), lat[:, focus], nearest


@dataclass
class PoolView:
    time_s: float
    tick_s: float
    site_ids: list[str]
    site_up: np.ndarray  # [S] bool
    latency_s: np.ndarray  # [S, S] one-way
    bandwidth_gbps: np.ndarray  # [S, S] bottleneck
    gpu_types: list[str]
    total_gpus: np.ndarray  # [S, G]
    free_gpus: np.ndarray  # [S, G] (0 at a down site)
    services: list[ServiceInfo]
    ready: np.ndarray  # [S, K] replicas serving
    replicas: np.ndarray  # [S, K] replicas serving or starting
    capacity_rps: np.ndarray  # [S, K] requests/s the site's replicas (serving or starting) sustain
    demand_rps: np.ndarray  # [S, K] requests/s arriving at each ingress site last tick
    load: np.ndarray  # [S, K] utilisation of the site's replicas last tick
    slo_recent: np.ndarray  # [K] SLO attainment last tick
    overflow: np.ndarray  # [S, K] current overflow target (site index or −1)
    offers: list[JobOffer]
    training_gpus: np.ndarray  # [S] GPUs held by training shards
    population: np.ndarray  # [S] ingress weight of the site (normalised)
    pool: PoolStats | None = None
    """Pool-wide broadcasts; None: the view is the whole pool (`pool_stats()` computes them)."""

    @property
    def n_sites(self) -> int:
        return len(self.site_ids)

    @property
    def n_services(self) -> int:
        return len(self.services)

    def pool_stats(self) -> PoolStats:
        """`pool`, or the figures of this view's rows when it is the whole pool."""
        if self.pool is None:
            tp = np.array([s.tp for s in self.services], float).reshape(self.n_services, len(self.gpu_types))
            self.pool = PoolStats.of(self.site_up, self.total_gpus, self.free_gpus, self.training_gpus,
                                     self.replicas, 0, 0.0, self.demand_rps, self.capacity_rps, self.latency_s, tp,
                                     self.population)
        return self.pool

    def capacity_per_replica(self) -> np.ndarray:
        """[S, K] requests/s a new replica at each site would sustain (best GPU type with room)."""
        out = np.zeros((self.n_sites, self.n_services))
        for k in range(self.n_services):
            out[:, k] = self.replica_capacity(k)
        return out

    def replica_capacity(self, k: int) -> np.ndarray:
        """[S] column k of `capacity_per_replica`."""
        return self.services[k].replica_room(self.free_gpus)

    def best_mu(self) -> np.ndarray:
        """[K] requests/s of one replica on the best GPU type of the pool."""
        return np.array([s.mu.max() if len(s.mu) else 0.0 for s in self.services])


@dataclass
class Actions:
    """Decisions for one tick.

    replica_delta [S, K]: replicas to add (+) or remove (−) per site and service.
    accept [S, O]: bid of each site for each offered job (> 0 takes shards, higher first).
    overflow [S, K]: site index that takes a site's overflow of a service (−1: nearest with room).
    """

    replica_delta: np.ndarray
    accept: np.ndarray | None = None
    overflow: np.ndarray | None = None
