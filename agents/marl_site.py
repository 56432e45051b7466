"""The learned MARL policy inside a live site agent (`cncbrain agent --policy marl[:PATH]`).

The numpy runtime (`agents.runtime.MarlPolicy.decide_site`) decides for one site of a `PoolView`.
A live agent never sees the whole pool: it builds a small view from perception's snapshot with

- its own site and its k nearest neighbours (k from the policy file, nearest by the latency of the
  links the site measures), from their `SiteStatus` (GPUs, services, liveness);
- one aggregate "rest of the pool" row, down and beyond every neighbour, that carries the pool-wide
  per-service figures of the snapshot's `ServiceSummary` (replicas, demand) minus what the local
  rows hold, so the runtime's pool-wide sums (pool demand ÷ capacity, replicas ÷ max, SLO last
  tick) come out as in the twin while no other site's state is read.

Per-service model figures (GPUs per replica, requests/s per replica on each GPU type) are those of
the twin's cost model for the service's spec; specs are read once per workload from the state of
record (`cnc-workloads`, off the hot path) and cached.

Mapping of the runtime's heads onto the live protocol:
- replica head (−1/0/+1 per service) → a SCALE proposal (cooldown as the greedy autoscaler);
- accept head for a training offer → bid strength → units that fit and cost = −strength
  (the scheduler fills the cheapest first, so the highest bidder gets the gang, as in the twin);
- inference offers (a new service's min_replicas): the service is put in the view with no
  replicas and its declared rate as demand at its ingress; a site whose policy adds a replica
  answers at the greedy price, any other site answers at that price + `RELUCTANT` (so a service is
  placed even when no policy asks for it, where the policies want it first);
- the overflow head has no live counterpart (requests are routed by the pool) and is ignored.

Approximations (documented in docs/live-brain.md): a site's capacity is its replicas × the
requests/s of one replica on the best GPU type it has; ingress weight (population) is neutral (1);
the waiting time of an offer is 0.

Offer rounds are answered for all the sites of a process at once (`answer_sites`): one view whose
rows are those sites, their k nearest neighbours and the rest of the pool, and one batched
forward pass (`MarlPolicy.act`) per offered service (training offers: per MAX_OFFERS of them).
Each site's decision is its own row: the runtime computes a row from that site, its k nearest
neighbours and the pool-wide sums only, so each site still decides from its local observation;
what the sites share is the list of services in view (the local sites' services first, then the
pool's busiest) and the GPU types that set the demand unit. This costs about one site's decision
for the whole process instead of one per site.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from typing import NamedTuple

import numpy as np

from agents.features import MAX_OFFERS, ServiceColumn
from agents.site_agent import ScaleWish, SitePolicy
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.twin.view import JobOffer, PoolStats, PoolView, ServiceInfo

log = logging.getLogger(__name__)
RELUCTANT = 1000.0
FAR_S = 1e3
"""Latency of the aggregate row: never among a site's nearest neighbours."""
PENDING_TTL_S = 120.0
"""How long the training offers of the last round count as the pool's waiting jobs."""


def service_model(spec: common.InferenceServiceSpec, gpu_types: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, mu, bmax) per GPU type of a service, as the twin computes them (mean prompt/output
    lengths of its trace); shared by every site of the process and every service of one model."""
    return _service_model(spec.model, spec.params_b, spec.trace or "conv", tuple(gpu_types))


@functools.lru_cache(maxsize=1024)
def _service_model(model: str, params_b: float, trace_name: str,
                   gpu_types: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from agents.executor_emulated import twin_model
    from cncbrain.twin import costmodel
    from cncbrain.twin.traces import load_azure

    m = costmodel.model(twin_model(model, params_b))
    trace = load_azure(trace_name)
    mp, mo = float(trace.prompt.mean()), float(trace.output.mean())
    ctx = mp + mo / 2
    gpus = [costmodel.gpu(t) for t in gpu_types]
    tp = np.array([costmodel.min_tp(m, g, "bf16") for g in gpus])
    bmax = np.array([costmodel.max_batch(m, g, max(int(t), 1), ctx, "bf16") if t else 0 for g, t in zip(gpus, tp, strict=True)])
    mu = np.zeros(len(gpus))
    for i, g in enumerate(gpus):
        if tp[i] and bmax[i] > 0:
            pre = float(costmodel.prefill_s(m, g, tp[i], mp, "bf16"))
            step = float(costmodel.decode_step_s(m, g, tp[i], bmax[i], ctx, "bf16"))
            mu[i] = 1.0 / (pre + mo * step / bmax[i])
    tp = np.where(bmax == 0, 0, tp)
    return tp, mu, bmax


@dataclasses.dataclass
class _Rows:
    """The sites of a live view, before the services are added (see `MarlSitePolicy._rows`)."""

    rows: list[tuple]
    ids: list[str]
    n_mine: int
    gpu_types: list[str]
    placed: dict[str, list[tuple[int, object]]]
    """Each service the rows report: [(row, its load message)] in row order."""


@dataclasses.dataclass
class _OfferBase:
    """A view of a process's sites without the offered service, and its observation (`wants`)."""

    inputs: tuple
    """The snapshot and each site's (site, telemetry, available) it was built from (compared by identity)."""
    jobs_learned: int
    """Training specs known then (they set the view's training GPUs)."""
    unknown: list[str]
    """The ids `_service_ids` passed over for want of a spec: one learned since may be in view now."""
    rows: _Rows
    wids: list[str]
    view: PoolView
    feat: object
    obs: object
    """`agents.features.Obs` of my sites' rows."""

    def holds(self, inputs: tuple, book: SpecBook) -> bool:
        """Whether this is still the view of `inputs` (a spec, once learned, is never replaced)."""
        return (self.jobs_learned == book.jobs_learned and len(self.inputs) == len(inputs)
                and all(a is b for a, b in zip(self.inputs, inputs, strict=True))
                and not any(w in book.specs for w in self.unknown))


class _PoolFacts(NamedTuple):
    """What one snapshot says about the whole pool: its `PoolStats` (the figures the twin
    broadcasts, computed the twin's way from the snapshot's sites), the GPU types, the total of
    the sites' ingress weights, and each service's column in `stats.service_*`."""

    stats: PoolStats
    gpu_types: list[str]
    weight_total: float
    service_index: dict[str, int]

    @classmethod
    def of(cls, snap: ppb.Snapshot | None, book: SpecBook) -> _PoolFacts:
        if snap is None:
            return cls(PoolStats(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, np.zeros(0), np.zeros(0)), [], 0.0, {})
        pools = [st.gpu_pools or st.site.gpu_pools for st in snap.sites]
        types = sorted({p.gpu_type for ps in pools for p in ps})
        column = {t: g for g, t in enumerate(types)}
        services = {wid: j for j, wid in enumerate(dict.fromkeys(x.workload_id for st in snap.sites for x in st.services))}
        S = len(snap.sites)
        up = np.array([st.state == common.SITE_STATE_UP for st in snap.sites], bool)
        total, free = np.zeros((S, len(types))), np.zeros((S, len(types)))
        training, replicas = np.zeros(S), np.zeros((S, len(services)))
        for i, (st, ps) in enumerate(zip(snap.sites, pools, strict=True)):
            for p in ps:
                total[i, column[p.gpu_type]] += p.count
                if up[i]:
                    free[i, column[p.gpu_type]] += max(0, p.count - p.used)
            for x in st.services:
                replicas[i, services[x.workload_id]] += x.replicas
            for j in st.jobs:
                spec = book.specs.get(j.workload_id)
                if isinstance(spec, common.TrainingJobSpec):
                    training[i] += j.shards_running * spec.gpus_per_shard
        stats = PoolStats.of(up, total, free, training, replicas)
        weight = sum(max(st.site.ingress_weight, 0.0) for st in snap.sites)
        return cls(stats, types, weight, services)

    def service(self, wid: str) -> tuple[float, float]:
        """(most replicas of the service `wid` at one site, sites running it); 0s for one not in the snapshot."""
        j = self.service_index.get(wid)
        if j is None:
            return 0.0, 0.0
        return float(self.stats.service_replicas_max[j]), float(self.stats.service_sites[j])


class SpecBook:
    """Specs of the pool's workloads, read once each from the state of record and cached (one
    book per process, shared by its site agents: `SpecBook.shared()`)."""

    _shared: SpecBook | None = None

    @classmethod
    def shared(cls) -> SpecBook:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        self.specs: dict[str, common.InferenceServiceSpec | common.TrainingJobSpec] = {}
        self._tried: dict[str, float] = {}
        self.jobs_learned = 0
        """Training specs learned so far (a view's training GPUs depend on them; see `wants`)."""
        self.pending: tuple[int, float, float] = (0, 0.0, -1e9)
        """Training jobs waiting for placement in the last offer round: (jobs, GPUs, monotonic time)."""

    def note_pending(self, training_offers) -> None:
        """The training jobs of an offer round: the pool's waiting jobs (a `PoolStats` broadcast)."""
        self.pending = (len(training_offers), float(sum(o.units * o.gpus_per_unit for o in training_offers)),
                        time.monotonic())

    def learn(self, workload_id: str, spec: common.InferenceServiceSpec | common.TrainingJobSpec) -> None:
        if workload_id not in self.specs:
            self.specs[workload_id] = spec
            self.jobs_learned += isinstance(spec, common.TrainingJobSpec)

    async def fetch(self, bus, workload_ids) -> None:
        from cncbrain.bus import KV_WORKLOADS

        missing = [w for w in workload_ids if w not in self.specs and time.monotonic() - self._tried.get(w, -1e9) > 5.0]
        if not missing:
            return
        kv = await bus.kv(KV_WORKLOADS)
        for wid in missing:
            self._tried[wid] = time.monotonic()
            try:
                entry = await kv.get(wid)
            except Exception:  # not stored (yet), or NATS busy: tried again later
                continue
            w = spb.Workload.FromString(entry.value or b"")
            which = w.WhichOneof("spec")
            if which:
                self.learn(wid, getattr(w, which))


class MarlSitePolicy(SitePolicy):
    """A site agent's learned policy: the MARL runtime over the site's local view."""

    name = "marl"

    def __init__(self, path: str | None = None, cooldown_s: float = 3.0) -> None:
        super().__init__(cooldown_s=cooldown_s)
        from agents.runtime import MarlPolicy

        self.runtime = MarlPolicy(path)
        self.k = self.runtime.actor.k
        self.book = SpecBook.shared()
        self.snapshot: ppb.Snapshot | None = None
        self._latency: np.ndarray | None = None
        self._latency_key: tuple | None = None
        self._neighbours: dict[tuple[str, int], list[str]] = {}
        self._pool_key: ppb.Snapshot | None = None
        self._pool: tuple[dict, list[str]] = ({}, [])
        self._facts: _PoolFacts | None = None
        self._facts_key: ppb.Snapshot | None = None
        self._focus_key: ppb.Snapshot | None = None
        self._focus_cache: dict = {}
        self._base: _OfferBase | None = None
        self.decisions = 0

    # --- inputs ---------------------------------------------------------------------------------
    async def observe(self, bus, snapshot: ppb.Snapshot, site: common.Site) -> None:
        """Keep the snapshot; learn the specs of the services this site's view needs."""
        self.snapshot = snapshot
        local = {s.site.site_id for s in self._local_sites(snapshot, site)}
        wanted = [x.workload_id for x in snapshot.services]
        wanted += [j.workload_id for s in snapshot.sites if s.site.site_id in local for j in s.jobs]
        await self.book.fetch(bus, wanted)

    def _neighbour_ids(self, site: common.Site) -> list[str]:
        key = (site.site_id, len(site.links))
        found = self._neighbours.get(key)
        if found is None:
            links = sorted((lk.latency_ms, lk.peer_site_id) for lk in site.links if lk.peer_site_id != site.site_id)
            found = self._neighbours[key] = [peer for _, peer in links[: self.k]]
        return found

    def _local_sites(self, snapshot: ppb.Snapshot | None, site: common.Site) -> list[ppb.SiteStatus]:
        by_id = {s.site.site_id: s for s in snapshot.sites} if snapshot else {}
        out = [by_id.get(site.site_id) or ppb.SiteStatus(site=site, state=common.SITE_STATE_UP,
                                                                    gpu_pools=site.gpu_pools)]
        for peer in self._neighbour_ids(site):
            if peer in by_id:
                out.append(by_id[peer])
        return out

    @staticmethod
    def _model(wid: str, spec: common.InferenceServiceSpec, gpu_types: list[str]):
        return service_model(spec, gpu_types)

    # --- the local view -------------------------------------------------------------------------
    def view(self, site: common.Site, telemetry: site_pb.SiteTelemetry | None, available: bool,
             extra: common.InferenceServiceSpec | None = None, extra_id: str = "",
             offers: list[spb.Offer] = ()) -> tuple[PoolView, list[str]]:
        """This site's view: rows [me, k nearest neighbours, rest of the pool]; services: those at
        this site first, then every other of the pool, busiest first (plus `extra`, an offered service)."""
        return self.view_of([(site, telemetry, available)], extra, extra_id, offers)

    def view_of(self, mine: list[tuple[common.Site, site_pb.SiteTelemetry | None, bool]],
                extra: common.InferenceServiceSpec | None = None, extra_id: str = "",
                offers: list[spb.Offer] = ()) -> tuple[PoolView, list[str]]:
        """One view for the sites `mine` (site, its own telemetry, available) of this process: rows
        [each of mine, their k nearest neighbours, rest of the pool]; services: those at my sites
        first, then every other of the pool, busiest first (plus `extra`, an offered service). Row i < len(mine)
        is mine[i]; with one site this is that site's local view."""
        rows = self._rows(mine)
        wids, _ = self._service_ids(rows, extra_id if extra is not None else None)
        columns = [self._service_column(rows, wid, self.book.specs[wid]) for wid in wids]
        if extra is not None:
            columns.append(self._service_column(rows, extra_id, extra, offered=True))
            wids = [*wids, extra_id]
        return self._assemble(mine, rows, columns, offers), wids

    def _rows(self, mine: list[tuple[common.Site, site_pb.SiteTelemetry | None, bool]]) -> _Rows:
        """The view's sites: mine (from their own telemetry), their k nearest neighbours (from the
        snapshot), each as (site id, up, GPU pools, services, jobs, links or None, ingress weight)."""
        snap = self.snapshot
        by_id = {s.site.site_id: s for s in snap.sites} if snap else {}
        rows: list[tuple] = []
        ids: list[str] = []
        for site, telemetry, available in mine:
            if telemetry is not None:  # the agent's own telemetry is fresher than the snapshot's copy
                rows.append((site.site_id, bool(available), telemetry.gpu_pools or site.gpu_pools,
                             telemetry.services, telemetry.jobs, site.links, site.ingress_weight))
            elif (st := by_id.get(site.site_id)) is not None:
                rows.append((site.site_id, st.state == common.SITE_STATE_UP, st.gpu_pools or st.site.gpu_pools,
                             st.services, st.jobs, site.links, site.ingress_weight))
            else:
                rows.append((site.site_id, True, site.gpu_pools, (), (), site.links, site.ingress_weight))
            ids.append(site.site_id)
        n_mine = len(rows)
        for site, _, _ in mine:
            for peer in self._neighbour_ids(site):
                if peer in by_id and peer not in ids:
                    st = by_id[peer]
                    rows.append((peer, st.state == common.SITE_STATE_UP, st.gpu_pools or st.site.gpu_pools,
                                 st.services, st.jobs, None, st.site.ingress_weight))
                    ids.append(peer)
        placed: dict[str, list[tuple[int, object]]] = {}
        for i, r in enumerate(rows):
            for x in r[3]:
                placed.setdefault(x.workload_id, []).append((i, x))
        types = set(self._pool_facts(snap).gpu_types) | {p.gpu_type for r in rows for p in r[2]}
        return _Rows(rows, ids, n_mine, sorted(types), placed)

    def _service_ids(self, rows: _Rows, exclude: str | None = None) -> tuple[list[str], list[str]]:
        """Services in view: those at my sites first, then the pool's others, busiest first (each
        with a known inference spec; no cap), never `exclude`; and the ids passed over with no spec known."""
        _, busiest = self._pool_services(self.snapshot)
        specs = self.book.specs
        wids: list[str] = []
        unknown: list[str] = []
        seen = {exclude} if exclude is not None else set()
        for w in itertools.chain((x.workload_id for r in rows.rows[:rows.n_mine] for x in r[3]), busiest):
            if w not in seen:
                seen.add(w)
                spec = specs.get(w)
                if isinstance(spec, common.InferenceServiceSpec):
                    wids.append(w)
                elif spec is None:
                    unknown.append(w)
        return wids, unknown

    def _assemble(self, mine, rows: _Rows, columns: list[ServiceColumn], offers: list[spb.Offer] = ()) -> PoolView:
        """The `PoolView` of `rows` with the services `columns` (`_service_column`) and training `offers`."""
        snap = self.snapshot
        rows_, ids, n_mine, gpu_types = rows.rows, rows.ids, rows.n_mine, rows.gpu_types
        S = len(rows_) + 1
        G = len(gpu_types)
        gi = {t: i for i, t in enumerate(gpu_types)}
        total = np.zeros((S, G), np.int64)
        free = np.zeros((S, G), np.int64)
        up = np.zeros(S, bool)
        for i, r in enumerate(rows_):
            up[i] = r[1]
            for p in r[2]:
                total[i, gi[p.gpu_type]] = p.count
                free[i, gi[p.gpu_type]] = max(0, p.count - p.used) if up[i] else 0
        # latency: my sites' links; the aggregate row (and whatever my sites do not measure) far away
        key = tuple(ids)
        if self._latency is None or self._latency_key != key:
            lat = np.full((S, S), FAR_S)
            np.fill_diagonal(lat, 0.0)
            index = {sid: i for i, sid in enumerate(ids)}
            for a in range(n_mine):
                for lk in rows_[a][5]:
                    b = index.get(lk.peer_site_id)
                    if b is not None and b != a:
                        lat[a, b] = lk.latency_ms / 1e3
                        if b >= n_mine:
                            lat[b, a] = lat[a, b]
            self._latency, self._latency_key = lat, key  # same array while the rows stay

        K = len(columns)
        services = [c.info for c in columns]

        def stack(i: int) -> np.ndarray:
            return np.stack([c[i] for c in columns], axis=1) if columns else np.zeros((S, 0))

        reps, dem, cap, load = stack(1), stack(3), stack(4), stack(5)
        slo = np.array([c.slo_recent for c in columns]) if columns else np.ones(0)
        job_offers = []
        if offers:
            hbm = {p.gpu_type: p.hbm_gb for site, _, _ in mine for p in site.gpu_pools if p.hbm_gb}
            for o in offers:
                fits = np.array([(not o.allowed_gpu_types or t in o.allowed_gpu_types)
                                 and hbm.get(t, 1e9) >= o.min_hbm_gb for t in gpu_types], bool)
                job_offers.append(JobOffer(o.workload_id, int(o.units), int(o.gpus_per_unit), fits, 0.0, ""))
        training = np.zeros(S)
        for i, r in enumerate(rows_):
            for j in r[4]:
                spec = self.book.specs.get(j.workload_id)
                if isinstance(spec, common.TrainingJobSpec):
                    training[i] += j.shards_running * spec.gpus_per_shard
        return PoolView(
            time_s=snap.sim_time_s if snap else 0.0, tick_s=1.0, site_ids=[*ids, "_rest"], site_up=up,
            latency_s=self._latency, bandwidth_gbps=np.zeros((S, S)), gpu_types=gpu_types,
            total_gpus=total, free_gpus=free, services=services, ready=reps.copy(), replicas=reps,
            capacity_rps=cap, demand_rps=dem, load=load, slo_recent=slo, overflow=np.full((S, K), -1),
            offers=job_offers, training_gpus=training, population=self._population(rows),
            pool=self._pool_stats(rows, columns),
        )

    def _population(self, rows: _Rows) -> np.ndarray:
        """[S] ingress weight of each row (the rest of the pool: what the rows leave), normalised over
        the pool's sites (uniform where no site declares one)."""
        facts = self._pool_facts(self.snapshot)
        S = len(rows.rows) + 1
        n = max(facts.stats.n_sites, S - 1)
        pop = np.zeros(S)
        if facts.weight_total > 0:
            for i, r in enumerate(rows.rows):
                pop[i] = max(r[6], 0.0) / facts.weight_total
        else:
            pop[:-1] = 1.0 / n
        pop[-1] = max(0.0, 1.0 - pop[:-1].sum())
        return pop

    def _pool_stats(self, rows: _Rows, columns: list[ServiceColumn]) -> PoolStats:
        """The pool broadcasts of the view: perception's snapshot (all sites), the waiting training
        jobs of the last offer round (for `PENDING_TTL_S`)."""
        f = self._pool_facts(self.snapshot).stats
        n_rows = len(rows.rows)
        up_rows = sum(1 for r in rows.rows if r[1])
        pending, pending_gpus, seen = self.book.pending
        if time.monotonic() - seen > PENDING_TTL_S:
            pending, pending_gpus = 0, 0.0
        stats = dataclasses.replace(f, n_sites=max(f.n_sites, n_rows), n_up=max(f.n_up, up_rows),
                                    service_replicas_max=np.array([c.replicas_max for c in columns], float),
                                    service_sites=np.array([c.sites for c in columns], float),
                                    pending_jobs=pending, pending_gpus=pending_gpus)
        if any(c.key for c in columns):  # where each service's demand is least covered, pool-wide
            S = n_rows + 1
            # NaN: a service not in the snapshot (an offered one), its focus worked out from the view's rows
            stats.service_uncovered_max = np.full(len(columns), np.nan)
            stats.focus_latency_s = np.full((S, len(columns)), FAR_S)
            stats.focus_nearest = np.zeros((S, len(columns)), bool)
            for j, c in enumerate(columns):
                if not c.key:
                    continue
                most, focus, nearest, lat_from = self._focus(c.key, c.info, rows.gpu_types)
                stats.service_uncovered_max[j] = most
                for i, r in enumerate(rows.rows):
                    stats.focus_latency_s[i, j] = 0.0 if r[0] == focus else lat_from.get(r[0], FAR_S)
                    stats.focus_nearest[i, j] = r[0] == nearest
        return stats

    def _focus(self, wid: str, info: ServiceInfo, gpu_types: list[str]) -> tuple[float, str, str, dict[str, float]]:
        """(most uncovered demand at one site, rps; that site — the service's focus; the site with room
        for a replica nearest to it; latency from the focus to each site, s) of the snapshot: what
        the twin's `PoolStats` broadcasts. Once per snapshot and service."""
        snap = self.snapshot
        key = (wid, tuple(gpu_types))
        if self._focus_key is not snap:
            self._focus_key, self._focus_cache = snap, {}
        found = self._focus_cache.get(key)
        if found is not None:
            return found
        gi = {t: g for g, t in enumerate(gpu_types)}
        best, focus, demand_best, demand_site = -1.0, "", -1.0, ""
        statuses = list(snap.sites) if snap else []
        for st in statuses:
            x = next((x for x in st.services if x.workload_id == wid), None)
            if x is None:
                continue
            mu = max((info.mu[gi[p.gpu_type]] for p in (st.gpu_pools or st.site.gpu_pools)
                      if p.gpu_type in gi and info.tp[gi[p.gpu_type]]), default=0.0)
            uncovered = max(x.request_rate_rps / 0.7 - x.replicas * mu, 0.0)
            if uncovered > best:
                best, focus = uncovered, st.site.site_id
            if x.request_rate_rps > demand_best:
                demand_best, demand_site = x.request_rate_rps, st.site.site_id
        if best <= 0:
            focus = demand_site
        lat_from: dict[str, float] = {}
        nearest, near_lat = "", float("inf")
        by_id = {st.site.site_id: st for st in statuses}
        if focus in by_id:
            lat_from = {lk.peer_site_id: lk.latency_ms / 1e3 for lk in by_id[focus].site.links}
            lat_from[focus] = 0.0
            for st in statuses:
                if st.state != common.SITE_STATE_UP:
                    continue
                room = any(p.gpu_type in gi and 0 < info.tp[gi[p.gpu_type]] <= p.count - p.used
                           for p in (st.gpu_pools or st.site.gpu_pools))
                d = lat_from.get(st.site.site_id, FAR_S)
                if room and d < near_lat:
                    nearest, near_lat = st.site.site_id, d
        found = self._focus_cache[key] = (max(best, 0.0), focus, nearest, lat_from)
        return found

    def _service_column(self, rows: _Rows, wid: str, spec: common.InferenceServiceSpec,
                        offered: bool = False) -> ServiceColumn:
        """One service of the view: its info and replicas (= ready), demand, capacity, load [S] and
        SLO last tick. Rows hold what the sites report; the aggregate row the pool-wide summary less
        the rows. offered: a new service (not placed yet): its declared rate at its ingress."""
        rows_, ids, gpu_types = rows.rows, rows.ids, rows.gpu_types
        S = len(rows_) + 1
        reps, dem, load, cap = np.zeros(S), np.zeros(S), np.zeros(S), np.zeros(S)
        here = rows.placed.get(wid, ())
        for i, x in here:
            reps[i] = x.replicas
            dem[i] = x.request_rate_rps
            load[i] = x.utilization
        tp, mu, bmax = self._model(wid, spec, gpu_types)
        info = ServiceInfo(spec.name, spec.model, spec.slo.ttft_ms / 1e3, spec.slo.tpot_ms / 1e3,
                           spec.min_replicas, spec.max_replicas, tp, mu, bmax)
        mu_max = float(mu.max()) if len(mu) else 0.0
        if here:
            gi = {t: g for g, t in enumerate(gpu_types)}
            for i in sorted({i for i, _ in here}):
                if reps[i]:
                    best = max((mu[gi[p.gpu_type]] for p in rows_[i][2] if tp[gi[p.gpu_type]]), default=mu_max)
                    cap[i] = reps[i] * best
        slo = 1.0
        agg = self._pool_services(self.snapshot)[0].get(wid)
        if agg is not None:  # the rest of the pool: pool-wide figure less the local rows
            reps[-1] = max(0.0, agg.replicas - reps[:-1].sum())
            dem[-1] = max(0.0, agg.request_rate_rps - dem[:-1].sum())
            cap[-1] = reps[-1] * mu_max
            slo = agg.requests_ok / agg.requests if agg.requests > 0 else 1.0
        if offered:  # its declared rate where it will enter: its ingress site, or spread by ingress weight
            if spec.ingress_site_id:
                dem[ids.index(spec.ingress_site_id) if spec.ingress_site_id in ids else S - 1] = spec.expected_rate_rps
            else:
                dem[:] = spec.expected_rate_rps * self._population(rows)
        most, sites = self._pool_facts(self.snapshot).service(wid)
        return ServiceColumn(info, reps, reps, dem, cap, load, slo, max(most, float(reps[:-1].max(initial=0))),
                             max(sites, float((reps[:-1] > 0).sum())), "" if offered else wid)

    def _pool_facts(self, snap: ppb.Snapshot | None) -> _PoolFacts:
        """Pool-wide figures of a snapshot (once per snapshot)."""
        if self._facts_key is not snap or self._facts is None:
            self._facts = _PoolFacts.of(snap, self.book)
            self._facts_key = snap
        return self._facts

    def _pool_services(self, snap: ppb.Snapshot | None) -> tuple[dict, list[str]]:
        """The snapshot's per-service summaries by id, and their ids busiest first (once per snapshot:
        a pool of thousands of services must not cost that much per offer)."""
        if snap is None:
            return {}, []
        if self._pool_key is not snap:
            summaries = {x.workload_id: x for x in snap.services}
            busiest = sorted(summaries, key=lambda w: -summaries[w].request_rate_rps)
            self._pool_key, self._pool = snap, (summaries, busiest)
        return self._pool

    def decide(self, view: PoolView) -> tuple[np.ndarray, np.ndarray]:
        self.decisions += 1
        delta, accept, _overflow = self.runtime.decide_site(view, 0)
        return delta, accept

    # --- a process's sites at once ---------------------------------------------------------------
    @property
    def batch_key(self) -> tuple[str, str]:
        """Policies with the same key answer an offer round together (`answer_sites`)."""
        return ("marl", str(self.runtime.path))

    _batchers: dict[str, MarlSitePolicy] = {}

    @classmethod
    def _batcher(cls, path: str) -> MarlSitePolicy:
        """The view builder and runtime of the batched path (one per policy file and process; its
        own latency and featurizer caches, so the sites' own per-site views keep theirs)."""
        found = cls._batchers.get(path)
        if found is None:
            found = cls._batchers[path] = cls(path)
        return found

    @classmethod
    def answer_sites(cls, members: list[tuple[MarlSitePolicy, common.Site, site_pb.SiteTelemetry | None, bool]],
                     offers, deadline: float | None = None) -> list[list[tuple[int, str, float, str]]]:
        """`answer_round` of several sites of this process (policy, site, telemetry, available),
        decided together: one view of all of them per offered service (per MAX_OFFERS training
        offers) and one forward pass for every site; each site's answer comes from its own row.

        deadline (unix seconds): when the scheduler stops listening. Offers the policy has not
        reached by then less a margin are answered without it (training: declined, offered again
        in the next round; inference: at the greedy price + RELUCTANT), so a big round is answered
        in time instead of not at all."""
        start = time.time()
        cutoff = deadline - max(0.02, 0.2 * (deadline - start)) if deadline else float("inf")
        lead = cls._batcher(str(members[0][0].runtime.path))
        snaps = [m[0].snapshot for m in members if m[0].snapshot is not None]
        lead.snapshot = max(snaps, key=lambda x: x.sequence) if snaps else None
        mine = [(site, telemetry, available) for _, site, telemetry, available in members]
        n = len(members)
        greedy = [[SitePolicy.answer(policy, o, site, telemetry, available) for o in offers]
                  for policy, site, telemetry, available in members]
        out: list[list[tuple[int, str, float, str]]] = [[] for _ in members]
        decided: dict[int, np.ndarray] = {}  # offer index → [n] bid (training) or wants (inference)
        is_training = [o.kind == common.WORKLOAD_KIND_TRAINING_JOB for o in offers]
        training = [i for i, t in enumerate(is_training) if t]
        lead.book.note_pending([offers[i] for i in training])
        late: set[int] = set()
        for c in range(0, len(training), MAX_OFFERS):
            chunk = training[c:c + MAX_OFFERS]
            if not any(greedy[m][i][0] for m in range(n) for i in chunk):
                continue
            if time.time() > cutoff:
                late.update(chunk)
                continue
            view, _ = lead.view_of(mine, offers=[offers[i] for i in chunk])
            feat, obs, choice = lead.runtime.choices(view, np.arange(n))
            acts = feat.to_actions(view, choice, obs, np.arange(n))
            for o_i, i in enumerate(chunk):
                decided[i] = acts.accept[:n, o_i] if acts.accept is not None and o_i < acts.accept.shape[1] \
                    else np.zeros(n)
        for i, o in enumerate(offers):
            if is_training[i] or not any(greedy[m][i][0] for m in range(n)):
                continue
            spec = lead.book.specs.get(o.workload_id)
            if time.time() > cutoff:
                late.add(i)
            elif isinstance(spec, common.InferenceServiceSpec):
                decided[i] = lead.wants(mine, o.workload_id, spec)
        per_site = {i: d.tolist() for i, d in decided.items()}  # python floats / bools, read per site
        for m in range(n):
            members[m][0].decisions += 1
            for i in range(len(offers)):
                units, gpu_type, cost, reason = greedy[m][i]
                if is_training[i]:
                    bid = float(per_site[i][m]) if i in per_site else 0.0
                    out[m].append((units, gpu_type, -bid, f"marl bid {bid:.0f}: {reason}") if bid > 0 and units
                                  else (0, "", 0.0, "marl out of time" if i in late else "marl declines"))
                elif units:
                    wants = bool(per_site[i][m]) if i in per_site else False
                    verb = "out of time" if i in late else "adds" if wants else "keeps"
                    out[m].append((units, gpu_type, cost + (0.0 if wants else RELUCTANT), f"marl {verb}: {reason}"))
                else:
                    out[m].append((units, gpu_type, cost, reason))
        return out

    def wants(self, mine, wid: str, spec: common.InferenceServiceSpec) -> np.ndarray:
        """[len(mine)] whether each of the sites `mine` adds a replica of the offered service `wid`
        — the policy's replica head for it in `view_of(mine, extra=spec, extra_id=wid)`.

        The view without the offered service (its rows and services too), and its observation,
        are kept while the snapshot, the sites and their telemetry stay the same (executors replace
        a telemetry message, they never change one), no training spec is learned and none of the
        services passed over for want of a spec has one now (`_OfferBase.holds`); an offer then
        adds its service's block to the kept observation (`Featurizer.with_service`: one service
        block from the service's columns, no view built) and runs the actor on my sites' rows only.
        The same decision as the whole view's (tests)."""
        inputs = (self.snapshot, *(x for m in mine for x in m))
        base = self._base
        if base is None or not base.holds(inputs, self.book):
            rows = self._rows(mine)
            wids, unknown = self._service_ids(rows)
            view = self._assemble(mine, rows, [self._service_column(rows, w, self.book.specs[w]) for w in wids])
            feat = self.runtime.featurizer(view)
            obs = feat.build(view, np.arange(rows.n_mine))
            base = self._base = _OfferBase(inputs, self.book.jobs_learned, unknown, rows, wids, view, feat, obs)
        n = base.rows.n_mine
        if wid in base.wids:  # the offered service is in view already: the whole view decides
            view, all_wids = self.view_of(mine, extra=spec, extra_id=wid)
            feat, obs, choice = self.runtime.choices(view, np.arange(n))
            return choice.rep[:, all_wids.index(wid)] >= 2
        obs = base.feat.with_service(base.obs, base.view, np.arange(n),
                                     self._service_column(base.rows, wid, spec, offered=True))
        return self.runtime.actor.choose_replicas(obs, obs.K - 1) >= 2

    # --- the SitePolicy interface ---------------------------------------------------------------
    def answer_round(self, offers, site: common.Site, telemetry: site_pb.SiteTelemetry | None,
                     available: bool) -> list[tuple[int, str, float, str]]:
        out: list[tuple[int, str, float, str] | None] = [None] * len(offers)
        training = [(i, o) for i, o in enumerate(offers) if o.kind == common.WORKLOAD_KIND_TRAINING_JOB]
        self.book.note_pending([o for _, o in training])
        for c in range(0, len(training), MAX_OFFERS):
            chunk = training[c:c + MAX_OFFERS]
            view, _ = self.view(site, telemetry, available, offers=[o for _, o in chunk])
            _, accept = self.decide(view)
            for (i, o), bid in zip(chunk, accept, strict=False):
                units, gpu_type, _cost, reason = super().answer(o, site, telemetry, available)
                out[i] = (units, gpu_type, -float(bid), f"marl bid {bid:.0f}: {reason}") if bid > 0 and units \
                    else (0, "", 0.0, "marl declines")
        for i, o in enumerate(offers):
            if out[i] is not None:
                continue
            units, gpu_type, cost, reason = super().answer(o, site, telemetry, available)
            if units:
                spec = self.book.specs.get(o.workload_id)
                wants = False
                if isinstance(spec, common.InferenceServiceSpec):
                    view, wids = self.view(site, telemetry, available, extra=spec, extra_id=o.workload_id)
                    delta, _ = self.decide(view)
                    wants = bool(delta[wids.index(o.workload_id)] > 0)
                if not wants:
                    cost += RELUCTANT
                reason = f"marl {'adds' if wants else 'keeps'}: {reason}"
            out[i] = (units, gpu_type, cost, reason)
        return out  # type: ignore[return-value]

    def scale(self, snapshot: ppb.Snapshot, site: common.Site,
              telemetry: site_pb.SiteTelemetry | None, now: float) -> list[ScaleWish]:
        if telemetry is None or not telemetry.available:
            return []
        self.snapshot = snapshot
        view, wids = self.view(site, telemetry, True)
        if not wids:
            return []
        if self.runtime.coordinated:
            self.decisions += 1
            delta, priority = self.runtime.site_wishes(view, 0)
        else:
            delta, _ = self.decide(view)
        free = self.free_by_type(site, telemetry)
        best_type = max(free, key=lambda t: free[t]) if free else ""
        have = {x.workload_id: x.replicas for x in telemetry.services}
        wishes = []
        for j, wid in enumerate(wids):
            d = int(delta[j])
            if d == 0 or now - self._last_change.get(wid, 0.0) < self.cooldown_s:
                continue
            want = max(0, have.get(wid, 0) + d)
            if want == have.get(wid, 0):
                continue
            self._last_change[wid] = now
            context = None
            if self.runtime.coordinated:  # the scheduler grants the sites' wishes together (cncbrain.coordination)
                from agents.runtime import per_replica

                rate = view.replica_capacity(j)[0] if d > 0 else per_replica(view)[0, j]
                context = site_pb.ScaleContext(
                    snapshot_sequence=snapshot.sequence, pool_demand_rps=float(view.demand_rps[:, j].sum()),
                    pool_capacity_rps=float(view.capacity_rps[:, j].sum()), replica_rps=float(rate),
                    priority=float(priority[j]))
            wishes.append(ScaleWish(wid, want, best_type, f"marl {d:+d}", context))
        return wishes
