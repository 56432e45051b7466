"""What a site agent sees and how its discrete choices become the twin's `Actions`.

Everything here is numpy over the policy interface (`PoolView`), shared by the PettingZoo
environment (training), the numpy runtime (`agents.runtime`, the live brain) and the tests, so the
features a policy was trained on are exactly the ones it decides from.

The observation of a site is structured, not one padded vector: a **site block**, one **service
block per service** (any number: the policy applies one shared sub-network to every (site, service)
pair, so it is permutation-equivariant over services and has no cap), and one **offer block per
offered training job** (the twin offers the head of its queue, `MAX_OFFERS`). No feature is a raw
count that grows with the pool: GPUs are shares of the site or of the pool, a site's size is
relative to the pool's largest, demand and capacity are in replica units of the service.

| block   | per              | features                                                                 |
|---------|------------------|--------------------------------------------------------------------------|
| site    | site (`F_SITE`)  | up, free GPU share, training GPU share, ingress weight (log of × S),     |
|         |                  | first-tick flag, share of neighbours down, mean neighbour latency/20 ms, |
|         |                  | size ÷ largest site, my replicas ÷ most replicas at one site, pool free  |
|         |                  | share, pool training share, waiting training GPUs ÷ pool free GPUs,     |
|         |                  | waiting jobs (log), pool size (log S ÷ log 300), share of my free and of |
|         |                  | my installed GPUs with ≥ 70 GB (what training gangs need), my free share |
|         |                  | ÷ the pool's largest free share (1: the site a least-loaded rule picks), |
|         |                  | then per neighbour: latency/20 ms, up                                    |
| service | (site, service)  | active, replicas/4, has a replica, ready share, demand, capacity, load,   |
|         | (`f_svc(k)`)     | uncovered demand, capacity a new replica here adds, SLO last tick, pool |
|         |                  | wanted÷have capacity, pool replicas÷max, at min, at max, neighbours'     |
|         |                  | demand, capacity, room and load, my share of pool capacity and of pool   |
|         |                  | demand (× sites), my replicas ÷ most at one site, share of sites running |
|         |                  | it, GPUs per replica/8, log10 of one replica's requests/s, the "cover"  |
|         |                  | count/8, my uncovered demand ÷ the pool's most uncovered (1: where its  |
|         |                  | demand is least covered, its "focus"), my latency to the focus/20 ms,   |
|         |                  | whether I am the site with room nearest to the focus (where a           |
|         |                  | latency-aware rule adds), then per neighbour: its spare capacity         |
| offer   | (site, offer)    | present, GPUs asked ÷ my GPUs, shards that fit here ÷ shards, whole gang |
|         | (`F_OFFER`)      | fits here, shards that fit at the neighbours ÷ shards, waiting/600 s,    |
|         |                  | GPUs left after taking the gang ÷ my GPUs, GPUs asked ÷ pool free GPUs   |

Demand and capacity are in "replica units" (requests/s ÷ requests/s of one replica of the service on
the pool's best GPU type for it, ÷ 4). Pool-wide figures are the broadcasts of `PoolStats` and the
per-service sums; about other sites an agent only sees its k nearest neighbours by latency.

Action of a site (flat, for the PettingZoo env: `nvec(K, k) = [4]*K + [2]*MAX_OFFERS + [k+1]*K`):

| head             | values                                                                        |
|------------------|-------------------------------------------------------------------------------|
| replicas of j    | 0: remove one, 1: keep, 2: add one, 3: "cover" — add as many as cover the      |
|                  | pool's uncovered demand at the target utilisation (⌈deficit ÷ a new replica's |
|                  | rate here⌉, at most what fits here, what max_replicas leaves and `COVER_MAX`)  |
| accept offer o   | 0: decline, 1: bid (strength from local fit: a site that takes the whole gang |
|                  | bids highest, tightest fit first — the twin gives the gang to the highest     |
|                  | bidders)                                                                      |
| overflow of j    | 0: the twin's default (nearest with room), i: the i-th nearest neighbour      |

Masks allow: remove only where the site has a replica and the pool is above min_replicas; add only
where a replica fits and the pool is below max_replicas; cover only where add is allowed and it
would add at least two; bid only for a present offer of which a
shard fits here; overflow only to a neighbour that is up. "Keep", "decline" and "default" are
always allowed, and a down site (or an inactive service) has only those.

The centralised state for the critic (`state_size()`) pools the sites' site blocks and the (site,
service) blocks (mean and max), plus the episode's elapsed fraction and log S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from cncbrain.twin import costmodel
from cncbrain.twin.view import Actions, PoolView, ServiceInfo, focus_figures

MAX_OFFERS = 2
"""Offered training jobs an agent bids for each tick (the twin offers the head of its queue)."""
DEFAULT_NEIGHBOURS = 3
OBS_CLIP = 10.0
TARGET_UTIL = 0.7
"""Utilisation at which "uncovered demand" and "wanted capacity" are computed (the autoscalers' target)."""
BIG_GPU_GB = 70.0
"""GPUs with at least this much memory hold the training state of the gangs' shards (80 GB class)."""
F_SITE_BASE, F_SVC_BASE, F_OFFER = 17, 28, 8
N_REP, N_OFF = 4, 2
COVER_MAX = 16
"""Most replicas one "cover" choice adds at a site in one tick."""


def f_site(k: int = DEFAULT_NEIGHBOURS) -> int:
    return F_SITE_BASE + 2 * k


def f_svc(k: int = DEFAULT_NEIGHBOURS) -> int:
    return F_SVC_BASE + k


def obs_size(K: int, k: int = DEFAULT_NEIGHBOURS) -> int:
    """Length of the flat observation of a pool with K services (the env's observation space)."""
    return f_site(k) + K * f_svc(k) + MAX_OFFERS * F_OFFER


def nvec(K: int, k: int = DEFAULT_NEIGHBOURS) -> np.ndarray:
    """Choices per head of the flat action of a pool with K services."""
    return np.array([N_REP] * K + [N_OFF] * MAX_OFFERS + [k + 1] * K, dtype=np.int64)


def mask_size(K: int, k: int = DEFAULT_NEIGHBOURS) -> int:
    return int(nvec(K, k).sum())


def state_size(k: int = DEFAULT_NEIGHBOURS) -> int:
    return 2 * f_site(k) + 2 * f_svc(k) + 2


def neighbours(latency_s: np.ndarray, k: int) -> np.ndarray:
    """[S, k] indices of each site's k nearest other sites by latency (−1 where the pool is smaller)."""
    S = latency_s.shape[0]
    lat = np.where(np.isfinite(latency_s), latency_s, 1e9).astype(float)
    np.fill_diagonal(lat, np.inf)
    order = np.argsort(lat, axis=1, kind="stable")[:, : max(S - 1, 0)]
    out = np.full((S, k), -1, dtype=np.int64)
    n = min(k, S - 1)
    out[:, :n] = order[:, :n]
    return out


@lru_cache(maxsize=64)
def _big_types(gpu_types: tuple[str, ...]) -> np.ndarray:
    catalog = costmodel.gpu_catalog()
    return np.array([t in catalog and catalog[t].mem_gb >= BIG_GPU_GB for t in gpu_types], bool)


class ServiceColumn(NamedTuple):
    """One service of a view as the featurizer reads it: its `ServiceInfo` and its [S] columns
    (`PoolView.replicas[:, j]` etc.) and pool broadcasts. `of(view, j)` takes them from a view; a
    live agent builds one for an offered service without building a view for it."""

    info: ServiceInfo
    replicas: np.ndarray
    ready: np.ndarray
    demand_rps: np.ndarray
    capacity_rps: np.ndarray
    load: np.ndarray
    slo_recent: float
    replicas_max: float
    """Most replicas of the service at one site (pool-wide)."""
    sites: float
    """Sites running at least one replica (pool-wide)."""
    key: str = ""
    """The service's id where the caller has one (a live agent's workload id)."""

    @classmethod
    def of(cls, view: PoolView, j: int) -> ServiceColumn:
        pool = view.pool_stats()
        return cls(view.services[j], view.replicas[:, j], view.ready[:, j], view.demand_rps[:, j],
                   view.capacity_rps[:, j], view.load[:, j], float(view.slo_recent[j]),
                   float(pool.service_replicas_max[j]), float(pool.service_sites[j]))


class Services(NamedTuple):
    """Every service of a view stacked: per-service figures [K] / [K, G] and columns [S, K]."""

    mu: np.ndarray  # [K, G] requests/s of one replica per GPU type
    tp: np.ndarray  # [K, G] GPUs one replica needs per type (0: does not fit)
    min_replicas: np.ndarray  # [K]
    max_replicas: np.ndarray  # [K]
    active: np.ndarray  # [K] bool
    replicas: np.ndarray  # [S, K]
    ready: np.ndarray  # [S, K]
    demand_rps: np.ndarray  # [S, K]
    capacity_rps: np.ndarray  # [S, K]
    load: np.ndarray  # [S, K]
    slo_recent: np.ndarray  # [K]
    replicas_max: np.ndarray  # [K]
    sites: np.ndarray  # [K]
    uncovered_max: np.ndarray  # [K] rps
    focus_latency: np.ndarray  # [S, K] s
    focus_nearest: np.ndarray  # [S, K] bool

    @classmethod
    def of(cls, view: PoolView) -> Services:
        pool = view.pool_stats()
        G, K = len(view.gpu_types), view.n_services
        mu = np.array([s.mu for s in view.services], float).reshape(K, G)
        tp = np.array([s.tp for s in view.services], float).reshape(K, G)
        if pool.service_uncovered_max is None or pool.focus_latency_s is None:
            focus = focus_figures(view.site_up, view.free_gpus, view.demand_rps, view.capacity_rps, view.latency_s, tp,
                                  view.population)
        else:
            most, lat, nearest = (np.asarray(x) for x in (pool.service_uncovered_max, pool.focus_latency_s,
                                                           pool.focus_nearest))
            local = np.isnan(most)  # a service the broadcast does not know (an offered one): from the rows
            if local.any():
                l_most, l_lat, l_near = focus_figures(view.site_up, view.free_gpus, view.demand_rps, view.capacity_rps,
                                                      view.latency_s, tp, view.population)
                most, lat = np.where(local, l_most, most), np.where(local[None], l_lat, lat)
                nearest = np.where(local[None], l_near, nearest)
            focus = (most, lat, nearest)
        return cls(mu, tp, np.array([s.min_replicas for s in view.services], float),
                   np.array([s.max_replicas for s in view.services], float),
                   np.array([s.active for s in view.services], bool), view.replicas, view.ready, view.demand_rps,
                   view.capacity_rps, view.load, np.asarray(view.slo_recent, float),
                   np.asarray(pool.service_replicas_max, float), np.asarray(pool.service_sites, float), *focus)

    @classmethod
    def of_column(cls, col: ServiceColumn, view: PoolView) -> Services:
        """One service (not in `view`'s arrays) at the rows of `view`; its focus from those rows."""
        s = col.info
        c = lambda x: np.asarray(x, float)[:, None]  # noqa: E731
        tp = np.asarray(s.tp, float)[None]
        focus = focus_figures(view.site_up, view.free_gpus, c(col.demand_rps), c(col.capacity_rps), view.latency_s, tp,
                              view.population)
        return cls(np.asarray(s.mu, float)[None], tp, np.array([s.min_replicas], float),
                   np.array([s.max_replicas], float), np.array([s.active]), c(col.replicas), c(col.ready),
                   c(col.demand_rps), c(col.capacity_rps), c(col.load), np.array([col.slo_recent], float),
                   np.array([col.replicas_max], float), np.array([col.sites], float), *focus)


@dataclass
class Obs:
    """Structured observations and masks of N sites of one pool with K services and O offers."""

    site: np.ndarray  # [N, f_site] float32
    svc: np.ndarray  # [N, K, f_svc] float32
    offer: np.ndarray  # [N, O, F_OFFER] float32 (O = MAX_OFFERS, absent offers are zeros)
    m_rep: np.ndarray  # [N, K, 3] int8
    m_off: np.ndarray  # [N, O, 2] int8
    m_ov: np.ndarray  # [N, K, k+1] int8
    room: np.ndarray  # [N, O] shards of each offer that fit at the site (for the bid strength)
    cover: np.ndarray | None = None  # [N, K] replicas the "cover" choice adds (None: 2 everywhere)

    @property
    def n(self) -> int:
        return self.site.shape[0]

    @property
    def K(self) -> int:
        return self.svc.shape[1]

    def rows(self, idx) -> Obs:
        return Obs(self.site[idx], self.svc[idx], self.offer[idx], self.m_rep[idx], self.m_off[idx],
                   self.m_ov[idx], self.room[idx], None if self.cover is None else self.cover[idx])

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(obs [N, obs_size(K, k)] float32, mask [N, mask_size(K, k)] int8): the env's layout."""
        n = self.n
        obs = np.concatenate([self.site, self.svc.reshape(n, -1), self.offer.reshape(n, -1)], axis=1)
        mask = np.concatenate([self.m_rep.reshape(n, -1), self.m_off.reshape(n, -1), self.m_ov.reshape(n, -1)], axis=1)
        return obs, mask

    @classmethod
    def unflat(cls, obs: np.ndarray, mask: np.ndarray, k: int = DEFAULT_NEIGHBOURS) -> Obs:
        """The inverse of `flat` (K from the observation's length)."""
        obs = np.atleast_2d(obs)
        mask = np.atleast_2d(mask)
        n, fs, fv = obs.shape[0], f_site(k), f_svc(k)
        K = (obs.shape[1] - fs - MAX_OFFERS * F_OFFER) // fv
        if obs.shape[1] != obs_size(K, k) or mask.shape[1] != mask_size(K, k):
            raise ValueError(f"observation of {obs.shape[1]} floats / mask of {mask.shape[1]} is not a pool's "
                             f"(k={k}: {fs} + K×{fv} + {MAX_OFFERS}×{F_OFFER})")
        c = fs + K * fv
        r, o = K * N_REP, MAX_OFFERS * N_OFF
        return cls(obs[:, :fs], obs[:, fs:c].reshape(n, K, fv), obs[:, c:].reshape(n, MAX_OFFERS, F_OFFER),
                   mask[:, :r].reshape(n, K, N_REP), mask[:, r:r + o].reshape(n, MAX_OFFERS, N_OFF),
                   mask[:, r + o:].reshape(n, K, k + 1), np.zeros((n, MAX_OFFERS)))


class Choice(NamedTuple):
    """Discrete choices of N sites: replica [N, K] (0 remove, 1 keep, 2 add), offer [N, O]
    (0 decline, 1 bid), overflow [N, K] (0 default, i the i-th nearest neighbour)."""

    rep: np.ndarray
    off: np.ndarray
    ov: np.ndarray

    def flat(self) -> np.ndarray:
        return np.concatenate([self.rep, self.off, self.ov], axis=1).astype(np.int64)

    @classmethod
    def unflat(cls, choice: np.ndarray, K: int) -> Choice:
        choice = np.atleast_2d(np.asarray(choice, np.int64))
        return cls(choice[:, :K], choice[:, K:K + MAX_OFFERS], choice[:, K + MAX_OFFERS:K + MAX_OFFERS + K])

    @classmethod
    def keep(cls, n: int, K: int) -> Choice:
        return cls(np.ones((n, K), np.int64), np.zeros((n, MAX_OFFERS), np.int64), np.zeros((n, K), np.int64))


def _clipped32(x: np.ndarray) -> np.ndarray:
    """`x` clipped to ±OBS_CLIP (in place) as float32."""
    np.maximum(x, -OBS_CLIP, out=x)
    np.minimum(x, OBS_CLIP, out=x)
    return x.astype(np.float32)


class _ServiceFacts(NamedTuple):
    """What the service blocks of one set of services (`Services`) share across sites: pool-wide
    figures [K], demand and capacity in replica units [S, K], and the block's per-service columns
    (`row`: the features that are the same at every site)."""

    unit: np.ndarray  # [K] requests/s of one replica on the pool's best type for it
    dem: np.ndarray  # [S, K] demand in replica units
    cap: np.ndarray  # [S, K] capacity in replica units
    pool_reps: np.ndarray  # [K]
    deficit: np.ndarray  # [K] uncovered pool demand at the target utilisation, units
    left: np.ndarray  # [K] replicas max_replicas leaves
    can_remove: np.ndarray  # [K] bool
    can_add: np.ndarray  # [K] bool
    tp_fits: np.ndarray  # [K, G] bool: the service fits that type
    tp_div: np.ndarray  # [K, G] GPUs per replica, at least 1
    cap_den: np.ndarray  # [K] denominators of the shares of pool capacity, demand, most replicas,
    dem_den: np.ndarray  # most uncovered demand
    reps_den: np.ndarray
    unc_den: np.ndarray
    row: np.ndarray  # [K, f_svc] the per-service features, zeros elsewhere

    @classmethod
    def of(cls, sv: Services, pool, k: int) -> _ServiceFacts:
        K = len(sv.active)
        unit = np.maximum(sv.mu.max(axis=1, initial=0.0), 1e-9)
        dem = sv.demand_rps / unit
        cap = sv.capacity_rps / unit
        pool_dem, pool_cap = dem.sum(axis=0), cap.sum(axis=0)
        pool_reps = sv.replicas.sum(axis=0).astype(float)
        row = np.zeros((K, f_svc(k)))
        row[:, 0] = 1.0
        row[:, 9] = sv.slo_recent
        row[:, 10] = np.where(pool_dem > 0, np.minimum(pool_dem / TARGET_UTIL / np.maximum(pool_cap, 1e-6), 4.0), 0.0)
        row[:, 11] = pool_reps / np.maximum(sv.max_replicas, 1)
        row[:, 12] = pool_reps <= sv.min_replicas
        row[:, 13] = pool_reps >= sv.max_replicas
        row[:, 21] = sv.sites / max(pool.n_up, 1)
        if sv.mu.shape[1]:
            row[:, 22] = sv.tp[np.arange(K), sv.mu.argmax(axis=1)] / 8
        row[:, 23] = np.where(unit > 1e-9, np.log10(unit) / 2, 0.0)
        return cls(unit, dem, cap, pool_reps, np.maximum(pool_dem / TARGET_UTIL - pool_cap, 0.0),
                   np.maximum(sv.max_replicas - pool_reps, 0), pool_reps > sv.min_replicas,
                   pool_reps < sv.max_replicas, sv.tp > 0, np.maximum(sv.tp, 1), np.maximum(pool_cap, 1e-6),
                   np.maximum(pool_dem, 1e-6), np.maximum(sv.replicas_max, 1), np.maximum(sv.uncovered_max, 1e-9),
                   row)


class _ViewFacts(NamedTuple):
    """What the sites of one view share (`Featurizer._facts`): its services and their facts, the
    site block's pool-wide features, and the offered jobs' figures."""

    sv: Services
    svc: _ServiceFacts
    site_row: np.ndarray  # [5] site features 9–13 (pool shares, waiting training, pool size)
    first_tick: float
    big: np.ndarray  # [G] bool: GPU types of ≥ BIG_GPU_GB
    fits: np.ndarray  # [O, G] per offer (O ≤ MAX_OFFERS offered)
    shard: np.ndarray  # [O] GPUs per shard (≥ 1)
    need: np.ndarray  # [O] shards (≥ 1)
    asked: np.ndarray  # [O] GPUs
    waiting: np.ndarray  # [O] waiting time / 600 s
    asked_pool: np.ndarray  # [O] GPUs asked ÷ pool free GPUs (≤ 4)


class Featurizer:
    """Observations, masks and the centralised state of the sites of a pool, from a `PoolView`.

    Holds what is fixed for a pool (neighbour lists, the neighbour columns of the site block) and,
    for the last view, what its sites share (`_ViewFacts`); `build(view)` is called once per tick,
    `build(view, rows=[s])` computes site s alone (the same values as row s of the whole build).
    Every block is computed for all its rows and services at once."""

    def __init__(self, latency_s: np.ndarray, k: int = DEFAULT_NEIGHBOURS):
        self.k = k
        self.nbrs = neighbours(latency_s, k)  # [S, k]
        S = latency_s.shape[0]
        self.S = S
        valid = self.nbrs >= 0
        nb = np.where(valid, self.nbrs, 0)
        lat = np.where(np.isfinite(latency_s), latency_s, 1.0)
        self.nbr_lat = np.where(valid, lat[np.arange(S)[:, None], nb], 0.1)  # [S, k] seconds
        self.nbr_valid = valid
        self._nb = nb
        self._all_valid = bool(valid.all())
        self._hood = np.concatenate([np.arange(S)[:, None], nb], axis=1)  # [S, 1 + k] each site, then its neighbours
        # the site block's columns that depend on the pool alone: mean neighbour latency, per neighbour latency
        self._site_base = np.zeros((S, f_site(k)))
        self._site_base[:, 6] = self.nbr_lat.sum(axis=1) / max(k, 1) / 0.02
        self._site_base[:, F_SITE_BASE::2] = self.nbr_lat / 0.02
        self._view: tuple[PoolView, _ViewFacts] | None = None

    # ------------------------------------------------------------------ observations and masks
    def build(self, view: PoolView, rows: np.ndarray | list[int] | None = None) -> Obs:
        """Observations and masks of the sites `rows` (default: every site) of `view`."""
        rows = np.arange(self.S) if rows is None else np.asarray(rows, np.int64)
        vf = self._facts(view)
        hood = self._hood.take(rows, axis=0)
        free = view.free_gpus.take(hood.ravel(), axis=0)  # [n (1 + k), G] each row, then its neighbours
        nb_up = self._neighbours_up(view, rows, hood)
        site, live, total = self._site_block(view, vf, rows, nb_up)
        svc, m_rep, m_ov, cover = self._service_block(vf.sv, vf.svc, view, rows, hood, free, live, nb_up)
        offer, m_off, room = self._offer_block(vf, rows, free, live, total)
        return Obs(site, svc, offer, m_rep, m_off, m_ov, room, cover)

    def _facts(self, view: PoolView) -> _ViewFacts:
        """What the sites of `view` share, computed once for the last view."""
        if self._view is not None and self._view[0] is view:
            return self._view[1]
        pool = view.pool_stats()
        sv = Services.of(view)
        site_row = np.array([pool.gpus_free / max(pool.gpus_total, 1), pool.gpus_training / max(pool.gpus_total, 1),
                             min(pool.pending_gpus / max(pool.gpus_free, 1), 4.0), math.log1p(pool.pending_jobs) / 3,
                             math.log(max(pool.n_sites, 1)) / math.log(300)])
        offers = view.offers[:MAX_OFFERS]
        G = len(view.gpu_types)
        asked = np.array([off.n_shards * off.shard_gpus for off in offers], float)
        vf = _ViewFacts(sv, _ServiceFacts.of(sv, pool, self.k), site_row, float(view.time_s < view.tick_s * 0.5),
                        _big_types(tuple(view.gpu_types)),
                        np.array([off.fits for off in offers], bool).reshape(len(offers), G),
                        np.array([max(off.shard_gpus, 1) for off in offers], np.int64),
                        np.array([max(off.n_shards, 1) for off in offers], float), asked,
                        np.array([off.waiting_s for off in offers], float) / 600,
                        np.minimum(asked / max(pool.gpus_free, 1), 4.0))
        self._view = (view, vf)
        return vf

    def _neighbours_up(self, view: PoolView, rows: np.ndarray, hood: np.ndarray) -> np.ndarray:
        """[n, k] whether each neighbour of each row is up (False where a row has fewer than k)."""
        nb_up = view.site_up.take(hood[:, 1:])
        return nb_up if self._all_valid else np.where(self.nbr_valid.take(rows, axis=0), nb_up, False)

    def _site_block(self, view: PoolView, vf: _ViewFacts, rows: np.ndarray,
                    nb_up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(site blocks [n, f_site] float32, whether each row is up [n], its GPUs [n] (≥ 1))."""
        k = self.k
        pool = view.pool_stats()
        live = view.site_up.take(rows).astype(bool)
        total_g, free_g = view.total_gpus.take(rows, axis=0), view.free_gpus.take(rows, axis=0)
        free = free_g.sum(axis=1).astype(float)
        installed = total_g.sum(axis=1).astype(float)
        total = np.maximum(installed, 1)
        o = self._site_base.take(rows, axis=0)
        o[:, 0] = live
        o[:, 1] = free / total
        o[:, 2] = view.training_gpus.take(rows) / total
        o[:, 3] = np.log1p(view.population.take(rows) * pool.n_sites)
        o[:, 4] = vf.first_tick
        o[:, 5] = (self.nbr_valid.take(rows, axis=0) & ~nb_up).sum(axis=1) / max(k, 1)
        o[:, 7] = installed / max(pool.site_gpus_max, 1)
        o[:, 8] = view.replicas.take(rows, axis=0).sum(axis=1) / max(pool.site_replicas_max, 1) if view.n_services else 0.0
        o[:, 9:14] = vf.site_row
        o[:, 14] = free_g[:, vf.big].sum(axis=1) / np.maximum(free, 1)
        o[:, 15] = total_g[:, vf.big].sum(axis=1) / total
        o[:, 16] = o[:, 1] * live / max(pool.site_free_share_max, 1e-6)  # 1: the site least-loaded picks
        o[:, F_SITE_BASE + 1::2] = nb_up
        return _clipped32(o), live, total

    def _service_block(self, sv: Services, f: _ServiceFacts, view: PoolView, rows: np.ndarray, hood: np.ndarray,
                       free: np.ndarray, live: np.ndarray,
                       nb_up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(blocks [n, K, f_svc] float32, replica masks [n, K, 4], overflow masks [n, K, k+1], cover
        counts [n, K]) of the services `sv` (their facts `f`) at the sites `rows` (their neighbourhoods
        `hood` [n, 1 + k], the free GPUs there, `free` [n (1 + k), G], whether each row and each of its
        neighbours is up, `live` [n] and `nb_up` [n, k]), every service at once."""
        k = self.k
        n, K = len(rows), len(sv.active)
        nb = hood[:, 1:]
        pool = view.pool_stats()
        reps = sv.replicas.take(rows, axis=0).astype(float)  # [n, K]
        dem, cap = f.dem.take(rows, axis=0), f.cap.take(rows, axis=0)
        # capacity one more replica adds, at each row and at its neighbours: [n, 1 + k, K]
        free = free.astype(float)
        fit = f.tp_fits[None] & (free[:, None, :] >= sv.tp[None])  # [n (1 + k), K, G]
        room_all = (np.where(fit, sv.mu[None], 0.0).max(axis=2, initial=0.0) / f.unit).reshape(n, 1 + k, K)
        room, room_nb = room_all[:, 0], room_all[:, 1:]
        # "cover": the replicas (of the best type with room here) that would cover the pool's demand
        # at the target utilisation, at most what fits here and what max_replicas leaves
        own_free = free.reshape(n, 1 + k, free.shape[1])[:, 0]
        fits_n = np.where(f.tp_fits[None], own_free[:, None, :] // f.tp_div[None], 0).sum(axis=2)  # [n, K]
        cover = np.ceil(f.deficit / np.maximum(room, 1e-9))
        cover = np.minimum(np.minimum(cover, fits_n), f.left)
        addable = room > 0
        cover = np.where(addable, np.minimum(cover, COVER_MAX), 0).astype(np.int64)
        nd, ncap, nload = f.dem.take(nb, axis=0), f.cap.take(nb, axis=0), np.minimum(sv.load.take(nb, axis=0), 3.0)
        n_room = room_nb > 0
        if not self._all_valid:  # [n, k, K]
            valid = self.nbr_valid.take(rows, axis=0)[:, :, None]
            nd, ncap, nload = np.where(valid, nd, 0.0), np.where(valid, ncap, 0.0), np.where(valid, nload, 0)
            n_room = valid & n_room
        o = np.empty((n, K, f_svc(k)))
        o[:] = f.row
        o[:, :, 1] = reps / 4
        has = reps > 0
        o[:, :, 2] = has
        o[:, :, 3] = np.where(has, sv.ready.take(rows, axis=0) / np.maximum(reps, 1), 1.0)
        o[:, :, 4] = dem / 4
        o[:, :, 5] = cap / 4
        o[:, :, 6] = np.minimum(sv.load.take(rows, axis=0), 3.0)
        gap = dem / TARGET_UTIL - cap
        o[:, :, 7] = gap / 4
        o[:, :, 8] = room
        o[:, :, 14] = nd.sum(axis=1) / 4
        o[:, :, 15] = ncap.sum(axis=1) / 4
        o[:, :, 16] = n_room.sum(axis=1) / max(k, 1)
        o[:, :, 17] = nload.sum(axis=1) / max(k, 1)
        o[:, :, 18] = cap / f.cap_den * max(pool.n_up, 1)
        o[:, :, 19] = dem / f.dem_den * max(pool.n_sites, 1)
        o[:, :, 20] = reps / f.reps_den
        o[:, :, 24] = cover / 8
        uncovered = np.maximum(gap, 0.0) * f.unit  # rps
        o[:, :, 25] = uncovered / f.unc_den  # 1: where the demand is least covered
        o[:, :, 26] = sv.focus_latency.take(rows, axis=0) / 0.02
        o[:, :, 27] = sv.focus_nearest.take(rows, axis=0)  # the site a latency-aware rule adds to
        o[:, :, F_SVC_BASE:] = ((ncap * 0.8 - nd) / 4).transpose(0, 2, 1)
        act = sv.active[None, :]
        if not sv.active.all():
            o *= act[:, :, None]
        m_rep = np.zeros((n, K, N_REP), np.int8)
        m_rep[:, :, 1] = 1
        ok = live[:, None] & act
        m_rep[:, :, 0] = ok & has & f.can_remove
        m_rep[:, :, 2] = ok & addable & f.can_add
        m_rep[:, :, 3] = m_rep[:, :, 2] & (cover >= 2)
        m_ov = np.zeros((n, K, k + 1), np.int8)
        m_ov[:, :, 0] = 1
        m_ov[:, :, 1:] = nb_up[:, None, :] & ok[:, :, None]
        return _clipped32(o), m_rep, m_ov, cover * act

    def _offer_block(self, vf: _ViewFacts, rows: np.ndarray, free: np.ndarray, live: np.ndarray, total: np.ndarray):
        """(offer blocks [n, MAX_OFFERS, F_OFFER] float32, masks [n, MAX_OFFERS, 2], shards of each
        offer that fit at each row [n, MAX_OFFERS]); `free` [n (1 + k), G] and `total` [n] (≥ 1)
        are the GPUs free at each row and its neighbours and installed at each row."""
        k = self.k
        n = len(rows)
        offer = np.zeros((n, MAX_OFFERS, F_OFFER))
        m_off = np.zeros((n, MAX_OFFERS, N_OFF), np.int8)
        m_off[:, :, 0] = 1
        room = np.zeros((n, MAX_OFFERS))
        n_off = len(vf.need)
        if not n_off:
            return offer.astype(np.float32), m_off, room
        total = total[:, None]  # [n, 1]
        shard, need = vf.shard, vf.need
        per = np.where(vf.fits[None], free[:, None, :] // shard[None, :, None], 0).max(axis=2).reshape(n, 1 + k, n_off)
        mine, theirs = per[:, 0], per[:, 1:]
        if not self._all_valid:
            theirs = np.where(self.nbr_valid.take(rows, axis=0)[:, :, None], theirs, 0)
        o = offer[:, :n_off]
        o[:, :, 0] = 1.0
        o[:, :, 1] = vf.asked / total
        o[:, :, 2] = mine / need
        whole = mine >= need
        o[:, :, 3] = whole
        o[:, :, 4] = theirs.sum(axis=1) / need
        o[:, :, 5] = vf.waiting
        o[:, :, 6] = np.where(whole, (mine - need) * shard / total, 0.0)
        o[:, :, 7] = vf.asked_pool
        room[:, :n_off] = mine
        m_off[:, :n_off, 1] = live[:, None] & (mine >= 1)
        return _clipped32(offer), m_off, room

    def with_service(self, obs: Obs, view: PoolView, rows: np.ndarray | list[int], col: ServiceColumn) -> Obs:
        """`obs` (of the sites `rows` of `view`) with one more service, `col`, after its services:
        what `build` gives for `view` with that service added (test), at the cost of one service
        block — a live agent keeps the observation of its view and adds each offered service."""
        rows = np.asarray(rows, np.int64)
        if not col.info.active:
            raise ValueError(f"service {col.info.name!r} is not active")
        live = view.site_up.take(rows).astype(bool)
        sv = Services.of_column(col, view)
        hood = self._hood.take(rows, axis=0)
        out, m_rep, m_ov, cover = self._service_block(sv, _ServiceFacts.of(sv, view.pool_stats(), self.k), view, rows,
                                                      hood, view.free_gpus.take(hood.ravel(), axis=0), live,
                                                      self._neighbours_up(view, rows, hood))
        return Obs(obs.site, np.concatenate([obs.svc, out], axis=1), obs.offer,
                   np.concatenate([obs.m_rep, m_rep], axis=1), obs.m_off,
                   np.concatenate([obs.m_ov, m_ov], axis=1), obs.room,
                   None if obs.cover is None else np.concatenate([obs.cover, cover], axis=1))

    # ------------------------------------------------------------------ the critic's input
    def pooled_state(self, obs: Obs, elapsed: float) -> np.ndarray:
        """The critic's size-independent view of the pool: mean and max over sites of the site
        blocks and over (site, service) pairs of the service blocks, elapsed share, log S."""
        svc = obs.svc.reshape(-1, obs.svc.shape[2]) if obs.K else np.zeros((1, f_svc(self.k)), np.float32)
        return np.concatenate([obs.site.mean(axis=0), obs.site.max(axis=0), svc.mean(axis=0), svc.max(axis=0),
                               [elapsed, math.log(max(self.S, 1)) / math.log(300)]]).astype(np.float32)

    # ------------------------------------------------------------------ actions
    def row_actions(self, view: PoolView, choice: Choice, obs: Obs,
                    rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(replica delta [n, K], bids [n, offers], overflow target [n, K] (site index or −1)) of
        the choices of the sites `rows`; `obs` is their observation (its `room` sets the bids)."""
        K = view.n_services
        live = view.site_up.take(rows)
        rep = np.asarray(choice.rep)
        cover = np.full(rep.shape, 2) if obs.cover is None else obs.cover
        delta = np.where(live[:, None], np.where(rep == 3, cover, rep - 1), 0)
        accept = np.zeros((len(rows), len(view.offers)))
        n_off = min(len(view.offers), MAX_OFFERS)
        if n_off:
            need = self._facts(view).need
            r = obs.room[:, :n_off]
            strength = np.where(r >= need, 1000.0 - (r - need), r)
            bid = (np.asarray(choice.off)[:, :n_off] == 1) & live[:, None] & (r >= 1)
            accept[:, :n_off] = np.where(bid, strength, 0.0)
        if not K:
            return delta, accept, np.zeros((len(rows), 0), np.int64)
        ov = np.asarray(choice.ov)
        at = np.asarray(rows)[:, None] * self.k + np.maximum(ov - 1, 0)  # the chosen neighbour slot, flat
        nb, valid = self._nb.take(at), self.nbr_valid.take(at)
        return delta, accept, np.where((ov > 0) & valid, nb, -1)

    def to_actions(self, view: PoolView, choice: Choice, obs: Obs, rows: np.ndarray | None = None) -> Actions:
        """The twin's `Actions` of the choices of the sites `rows` (default: all; the other sites
        keep everything); `obs` is their observation (its `room` sets the bid strengths)."""
        S, K = self.S, view.n_services
        rows = np.arange(S) if rows is None else np.asarray(rows, np.int64)
        d, a, ov = self.row_actions(view, choice, obs, rows)
        delta = np.zeros((S, K), np.int64)
        accept = np.zeros((S, len(view.offers)))
        overflow = np.full((S, K), -1, np.int64)
        delta[rows], accept[rows], overflow[rows] = d, a, ov
        return Actions(delta, accept, overflow)

    def from_actions(self, view: PoolView, actions: Actions, obs: Obs | None = None) -> Choice:
        """The per-site choices closest to a (centralised) policy's `Actions`: a replica delta of
        −1/0/+1 as remove/keep/add, of 2 or more as "cover" where that choice is allowed (`obs`'s
        masks) and adds 2 or more, else as add; a positive bid as "bid", an overflow target as its
        neighbour slot (0 when it is not among the k nearest). Used to imitate the teachers."""
        S, K = self.S, view.n_services
        d = np.asarray(actions.replica_delta, np.int64).reshape(S, K)
        rep = np.clip(d, -1, 1) + 1
        if obs is not None and K:
            rep = np.where((d >= 2) & (obs.m_rep[:, :, 3] > 0), 3, rep)
        off = np.zeros((S, MAX_OFFERS), np.int64)
        if actions.accept is not None and len(view.offers):
            acc = np.asarray(actions.accept)
            n = min(acc.shape[1], MAX_OFFERS)
            off[:, :n] = acc[:, :n] > 0
        ov = np.zeros((S, K), np.int64)
        if actions.overflow is not None and K:
            tgt = np.asarray(actions.overflow).reshape(S, K)
            hit = (self._nb[:, None, :] == tgt[:, :, None]) & self.nbr_valid[:, None, :]  # [S, K, k]
            ov = np.where(hit.any(axis=2), hit.argmax(axis=2) + 1, 0)
        return Choice(rep, off, ov)
