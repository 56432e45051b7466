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

    @property
    def n_sites(self) -> int:
        return len(self.site_ids)

    @property
    def n_services(self) -> int:
        return len(self.services)

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
