"""The observation and actions of the first MARL policy format (`marl_v0.npz`, format 1), kept
so that a policy of that format can still be measured in the twin (`cncbrain eval --policy
marl:agents/policies/marl_v0.npz`): services padded to K_MAX = 4 (a fifth and later service got
no decision), 111 floats for k = 3. The current featurizer is `agents.features`; this file is not
used by training or by the live site agent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cncbrain.twin.view import Actions, PoolView, ServiceInfo

K_MAX = 4
"""Services an agent can manage (padded, with an `active` flag)."""
MAX_OFFERS = 2
"""Offered training jobs an agent bids for each tick (the twin offers the head of its queue)."""
DEFAULT_NEIGHBOURS = 3
OBS_CLIP = 10.0
TARGET_UTIL = 0.7
"""Utilisation at which "uncovered demand" and "wanted capacity" are computed (the autoscalers' target)."""
F_SITE, F_SVC, F_OFFER = 9, 18, 6


def obs_size(k: int = DEFAULT_NEIGHBOURS) -> int:
    return F_SITE + K_MAX * F_SVC + MAX_OFFERS * F_OFFER + k * (2 + K_MAX)


def nvec(k: int = DEFAULT_NEIGHBOURS) -> np.ndarray:
    return np.array([3] * K_MAX + [2] * MAX_OFFERS + [k + 1] * K_MAX, dtype=np.int64)


def mask_size(k: int = DEFAULT_NEIGHBOURS) -> int:
    return int(nvec(k).sum())


def state_size(k: int = DEFAULT_NEIGHBOURS) -> int:
    return 2 * obs_size(k) + 2


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


class _Column(NamedTuple):
    """One service of a view as the featurizer reads it: its `ServiceInfo` and its [S] columns
    (`PoolView.replicas[:, j]` etc.). `of(view, j)` takes them from a view; a live agent builds
    one for an offered service without building a view for it (`Featurizer.with_service`)."""

    info: ServiceInfo
    replicas: np.ndarray
    ready: np.ndarray
    demand_rps: np.ndarray
    capacity_rps: np.ndarray
    load: np.ndarray
    slo_recent: float

    @classmethod
    def of(cls, view: PoolView, j: int) -> _Column:
        return cls(view.services[j], view.replicas[:, j], view.ready[:, j], view.demand_rps[:, j],
                   view.capacity_rps[:, j], view.load[:, j], view.slo_recent[j])


def _shard_room(view: PoolView) -> np.ndarray:
    """[S, MAX_OFFERS] shards of each offered job that fit on one GPU type of each site."""
    S = view.n_sites
    room = np.zeros((S, MAX_OFFERS))
    for o, off in enumerate(view.offers[:MAX_OFFERS]):
        per = np.where(off.fits[None, :], view.free_gpus // max(off.shard_gpus, 1), 0)
        room[:, o] = per.max(axis=1)
    return room


class Featurizer:
    """Observations, masks and the centralised state of every site of a pool, from a `PoolView`.

    Holds what is fixed for a pool (neighbour lists); `build(view)` is called once per tick."""

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
        self.nvec = nvec(k)
        self.obs_dim = obs_size(k)
        self.mask_dim = mask_size(k)

    # ------------------------------------------------------------------ observations and masks
    def build(self, view: PoolView, elapsed: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(obs [S, obs_size], mask [S, mask_size] int8, state [state_size]) of the pool's sites."""
        S, k, nb, valid = self.S, self.k, self._nb, self.nbr_valid
        K = min(view.n_services, K_MAX)
        up = view.site_up.astype(float)
        total = view.total_gpus.sum(axis=1).astype(float)
        free = view.free_gpus.sum(axis=1).astype(float)
        obs = np.zeros((S, self.obs_dim))
        mask = np.zeros((S, self.mask_dim), dtype=np.int8)

        # --- site block
        c = 0
        obs[:, 0] = up
        obs[:, 1] = free / np.maximum(total, 1)
        obs[:, 2] = free / 32
        obs[:, 3] = view.training_gpus / np.maximum(total, 1)
        obs[:, 4] = view.population * S
        obs[:, 5] = float(view.time_s < view.tick_s * 0.5)
        nb_up = np.where(valid, up[nb], 0.0)
        obs[:, 6] = np.where(valid, 1 - nb_up, 0).sum(axis=1) / max(k, 1)
        obs[:, 7] = self.nbr_lat.mean(axis=1) / 0.02
        obs[:, 8] = total / 64
        c = F_SITE

        # --- service block
        spare_nb = np.zeros((S, k, K_MAX))
        m_add = np.zeros((S, K_MAX), dtype=bool)
        m_rem = np.zeros((S, K_MAX), dtype=bool)
        m_svc = np.zeros((S, K_MAX), dtype=bool)
        for j in range(K):
            if view.services[j].active:
                spare_nb[:, :, j], m_add[:, j], m_rem[:, j] = self._service_block(
                    _Column.of(view, j), view.free_gpus, obs[:, c:c + F_SVC])
                m_svc[:, j] = True
            c += F_SVC
        c = F_SITE + K_MAX * F_SVC

        # --- offer block
        room_o = _shard_room(view)
        m_acc = np.zeros((S, MAX_OFFERS), dtype=bool)
        for o_i, off in enumerate(view.offers[:MAX_OFFERS]):
            need = max(off.n_shards, 1)
            o = obs[:, c + o_i * F_OFFER: c + (o_i + 1) * F_OFFER]
            o[:, 0] = 1.0
            o[:, 1] = off.n_shards * off.shard_gpus / 64
            o[:, 2] = room_o[:, o_i] / need
            o[:, 3] = room_o[:, o_i] >= need
            o[:, 4] = np.where(valid, room_o[nb, o_i], 0).sum(axis=1) / need
            o[:, 5] = off.waiting_s / 600
            m_acc[:, o_i] = room_o[:, o_i] >= 1
        c += MAX_OFFERS * F_OFFER

        # --- neighbour block
        blk = obs[:, c:].reshape(S, k, 2 + K_MAX)
        blk[:, :, 0] = self.nbr_lat / 0.02
        blk[:, :, 1] = nb_up
        blk[:, :, 2:] = spare_nb
        np.clip(obs, -OBS_CLIP, OBS_CLIP, out=obs)

        # --- masks (a down site keeps only the no-op choices)
        live = view.site_up[:, None]
        m_add &= live
        m_rem &= live
        m_acc &= live
        mask3 = np.stack([m_rem, np.ones_like(m_rem), m_add], axis=2).reshape(S, 3 * K_MAX)
        acc2 = np.stack([np.ones_like(m_acc), m_acc], axis=2).reshape(S, 2 * MAX_OFFERS)
        ov_nb = (nb_up > 0) & valid  # [S, k]
        ov = np.concatenate([np.ones((S, K_MAX, 1), dtype=bool),
                             (ov_nb[:, None, :] & m_svc[:, :, None] & live[:, :, None])], axis=2)
        mask[:, : 3 * K_MAX] = mask3
        mask[:, 3 * K_MAX: 3 * K_MAX + 2 * MAX_OFFERS] = acc2
        mask[:, 3 * K_MAX + 2 * MAX_OFFERS:] = ov.reshape(S, K_MAX * (k + 1))
        self._room_o = room_o
        state = self.pooled_state(obs, elapsed)
        return obs.astype(np.float32), mask, state

    def _service_block(self, col: _Column, free_gpus: np.ndarray,
                       o: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Write the block of service `col` of every site into `o` [S, F_SVC] (float64, not yet
        clipped); return its neighbour spare capacity [S, k] and the add / remove masks [S] (before
        liveness). `free_gpus` [S, G]: the view's free GPUs."""
        nb, valid, k = self._nb, self.nbr_valid, self.k
        svc = col.info
        unit = max(float(svc.mu.max()) if len(svc.mu) else 0.0, 1e-9)
        dem = col.demand_rps / unit
        cap = col.capacity_rps / unit
        reps = col.replicas.astype(float)
        room = svc.replica_room(free_gpus) / unit
        pool_dem, pool_cap = dem.sum(), cap.sum()
        pool_reps = float(reps.sum())
        nd = np.where(valid, dem[nb], 0.0)
        ncap = np.where(valid, cap[nb], 0.0)
        # each feature written in place (out=): the same values as `o[:, f] = ...`, fewer temporaries
        o[:, 0] = 1.0
        np.divide(reps, 8, out=o[:, 1])
        np.divide(col.ready, 8, out=o[:, 2])
        np.divide(dem, 4, out=o[:, 3])
        np.divide(cap, 4, out=o[:, 4])
        np.minimum(col.load, 3.0, out=o[:, 5])
        uncovered = dem / TARGET_UTIL
        np.subtract(uncovered, cap, out=uncovered)
        np.divide(uncovered, 4, out=o[:, 6])
        o[:, 7] = room
        o[:, 8] = col.slo_recent
        o[:, 9] = min(pool_dem / TARGET_UTIL / max(pool_cap, 1e-6), 4.0) if pool_dem > 0 else 0.0
        o[:, 10] = pool_reps / max(svc.max_replicas, 1)
        o[:, 11] = float(pool_reps <= svc.min_replicas)
        np.divide(nd.sum(axis=1), 4, out=o[:, 12])
        np.divide(ncap.sum(axis=1), 4, out=o[:, 13])
        # means over the k neighbour slots as sum / k (what ndarray.mean computes, without its overhead)
        np.divide((valid & (room[nb] > 0)).sum(axis=1), k, out=o[:, 14])
        np.divide(np.where(valid, np.minimum(col.load[nb], 3.0), 0).sum(axis=1), k, out=o[:, 15])
        np.divide(cap, max(pool_cap, 1e-6), out=o[:, 16])
        np.divide(dem, max(pool_dem, 1e-6), out=o[:, 17])
        spare = np.where(valid, (ncap * 0.8 - nd) / 4, 0.0)
        add = (room > 0) & (pool_reps < svc.max_replicas)
        rem = (reps > 0) & (pool_reps > svc.min_replicas)
        return spare, add, rem

    def pooled_state(self, obs: np.ndarray, elapsed: float) -> np.ndarray:
        """The critic's size-independent view of the pool: mean and max over sites, elapsed, S."""
        return np.concatenate([obs.mean(axis=0), obs.max(axis=0), [elapsed, self.S / 64]]).astype(np.float32)

    # ------------------------------------------------------------------ actions
    def to_actions(self, view: PoolView, choice: np.ndarray) -> Actions:
        """Turn the sites' discrete choices [S, n_heads] into the twin's `Actions`."""
        S, K = self.S, view.n_services
        choice = np.asarray(choice, dtype=np.int64).reshape(S, len(self.nvec))
        Km = min(K, K_MAX)
        delta = np.zeros((S, K), np.int64)
        delta[:, :Km] = choice[:, :Km] - 1
        delta[~view.site_up] = 0
        n_off = len(view.offers)
        accept = np.zeros((S, n_off))
        room = getattr(self, "_room_o", None)
        if room is None or room.shape[0] != S:
            room = _shard_room(view)
        for o, off in enumerate(view.offers[:MAX_OFFERS]):
            need = max(off.n_shards, 1)
            r = room[:, o]
            strength = np.where(r >= need, 1000.0 - (r - need), r)
            accept[:, o] = np.where((choice[:, K_MAX + o] == 1) & view.site_up & (r >= 1), strength, 0.0)
        ov_choice = choice[:, K_MAX + MAX_OFFERS: K_MAX + MAX_OFFERS + Km]
        overflow = np.full((S, K), -1, np.int64)
        tgt = np.take_along_axis(self._nb, np.maximum(ov_choice - 1, 0), axis=1)
        ok = (ov_choice > 0) & np.take_along_axis(self.nbr_valid, np.maximum(ov_choice - 1, 0), axis=1)
        overflow[:, :Km] = np.where(ok, tgt, -1)
        return Actions(delta, accept, overflow)

