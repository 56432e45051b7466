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
the twin's physics for the service's spec; specs are read once per workload from the state of
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
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

from agents.site_agent import ScaleWish, SitePolicy
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2
from cnc.scheduler.v1 import scheduler_pb2 as sched
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.twin.view import JobOffer, PoolView, ServiceInfo

log = logging.getLogger(__name__)
RELUCTANT = 1000.0
FAR_S = 1e3
"""Latency of the aggregate row: never among a site's nearest neighbours."""
K_MAX = 4
MAX_OFFERS = 2


def service_model(spec: common.InferenceServiceSpec, gpu_types: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, mu, bmax) per GPU type of a service, as the twin computes them (mean prompt/output
    lengths of its trace); shared by every site of the process and every service of one model."""
    return _service_model(spec.model, spec.params_b, spec.trace or "conv", tuple(gpu_types))


@functools.lru_cache(maxsize=1024)
def _service_model(model: str, params_b: float, trace_name: str,
                   gpu_types: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from agents.executor_emulated import twin_model
    from cncbrain.twin import physics
    from cncbrain.twin.traces import load_azure

    m = physics.model(twin_model(model, params_b))
    trace = load_azure(trace_name)
    mp, mo = float(trace.prompt.mean()), float(trace.output.mean())
    ctx = mp + mo / 2
    gpus = [physics.gpu(t) for t in gpu_types]
    tp = np.array([physics.min_tp(m, g, "bf16") for g in gpus])
    bmax = np.array([physics.max_batch(m, g, max(int(t), 1), ctx, "bf16") if t else 0 for g, t in zip(gpus, tp, strict=True)])
    mu = np.zeros(len(gpus))
    for i, g in enumerate(gpus):
        if tp[i] and bmax[i] > 0:
            pre = float(physics.prefill_s(m, g, tp[i], mp, "bf16"))
            step = float(physics.decode_step_s(m, g, tp[i], bmax[i], ctx, "bf16"))
            mu[i] = 1.0 / (pre + mo * step / bmax[i])
    tp = np.where(bmax == 0, 0, tp)
    return tp, mu, bmax


class SpecBook:
    """Specs of the pool's workloads, read once each from the state of record and cached."""

    def __init__(self) -> None:
        self.specs: dict[str, common.InferenceServiceSpec | common.TrainingJobSpec] = {}
        self._tried: dict[str, float] = {}

    def learn(self, workload_id: str, spec: common.InferenceServiceSpec | common.TrainingJobSpec) -> None:
        self.specs.setdefault(workload_id, spec)

    async def fetch(self, bus, workload_ids) -> None:
        from cnc.scheduler.v1 import scheduler_pb2 as pb
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
            w = pb.Workload.FromString(entry.value or b"")
            which = w.WhichOneof("spec")
            if which:
                self.specs[wid] = getattr(w, which)


class MarlSitePolicy(SitePolicy):
    """A site agent's learned policy: the MARL runtime over the site's local view."""

    name = "marl"

    def __init__(self, path: str | None = None, cooldown_s: float = 3.0) -> None:
        super().__init__(cooldown_s=cooldown_s)
        from agents.runtime import MarlPolicy

        self.runtime = MarlPolicy(path)
        self.k = self.runtime.actor.k
        self.book = SpecBook()
        self.snapshot: perception_pb2.Snapshot | None = None
        self._latency: np.ndarray | None = None
        self._latency_key: tuple | None = None
        self.decisions = 0

    # --- inputs ---------------------------------------------------------------------------------
    async def observe(self, bus, snapshot: perception_pb2.Snapshot, site: common.Site) -> None:
        """Keep the snapshot; learn the specs of the services this site's view needs."""
        self.snapshot = snapshot
        local = {s.site.site_id for s in self._local_sites(snapshot, site)}
        wanted = [x.workload_id for x in snapshot.services]
        wanted += [j.workload_id for s in snapshot.sites if s.site.site_id in local for j in s.jobs]
        await self.book.fetch(bus, wanted)

    def _neighbour_ids(self, site: common.Site) -> list[str]:
        links = sorted((lk.latency_ms, lk.peer_site_id) for lk in site.links if lk.peer_site_id != site.site_id)
        return [peer for _, peer in links[: self.k]]

    def _local_sites(self, snapshot: perception_pb2.Snapshot | None, site: common.Site) -> list[perception_pb2.SiteStatus]:
        by_id = {s.site.site_id: s for s in snapshot.sites} if snapshot else {}
        out = [by_id.get(site.site_id) or perception_pb2.SiteStatus(site=site, state=common.SITE_STATE_UP,
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
             offers: list[sched.Offer] = ()) -> tuple[PoolView, list[str]]:
        """This site's view: rows [me, k nearest neighbours, rest of the pool]; services: those at
        this site first, then the pool's busiest, at most K_MAX (plus `extra`, an offered service)."""
        snap = self.snapshot
        local = self._local_sites(snap, site)
        if telemetry is not None:  # the agent's own telemetry is fresher than the snapshot's copy
            me = perception_pb2.SiteStatus(site=site, state=common.SITE_STATE_UP if available else common.SITE_STATE_DOWN)
            me.gpu_pools.extend(telemetry.gpu_pools)
            me.services.extend(telemetry.services)
            me.jobs.extend(telemetry.jobs)
            local[0] = me
        ids = [s.site.site_id for s in local]
        S = len(local) + 1
        gpu_types = sorted({p.gpu_type for s in local for p in (s.gpu_pools or s.site.gpu_pools)})
        G = len(gpu_types)
        gi = {t: i for i, t in enumerate(gpu_types)}
        total = np.zeros((S, G), np.int64)
        free = np.zeros((S, G), np.int64)
        up = np.zeros(S, bool)
        for i, s in enumerate(local):
            up[i] = s.state == common.SITE_STATE_UP
            for p in (s.gpu_pools or s.site.gpu_pools):
                total[i, gi[p.gpu_type]] = p.count
                free[i, gi[p.gpu_type]] = max(0, p.count - p.used) if up[i] else 0
        # latency: my links; the aggregate row far away
        lat = np.full((S, S), FAR_S)
        np.fill_diagonal(lat, 0.0)
        mine = {lk.peer_site_id: lk.latency_ms / 1e3 for lk in site.links}
        for i, sid in enumerate(ids[1:], start=1):
            lat[0, i] = lat[i, 0] = mine.get(sid, FAR_S)
        key = tuple(ids)
        if self._latency is None or self._latency_key != key:
            self._latency, self._latency_key = lat, key  # same array while the neighbours stay

        # services: at my site first, then the pool's busiest
        summaries = {x.workload_id: x for x in (snap.services if snap else [])}
        here = [x.workload_id for x in local[0].services]
        order = list(dict.fromkeys(here + sorted(summaries, key=lambda w: -summaries[w].request_rate_rps)))
        wids = [w for w in order if isinstance(self.book.specs.get(w), common.InferenceServiceSpec)]
        if extra is not None:
            wids = [w for w in wids if w != extra_id][: K_MAX - 1] + [extra_id]
        wids = wids[:K_MAX]
        K = len(wids)
        services = []
        reps = np.zeros((S, K))
        dem = np.zeros((S, K))
        load = np.zeros((S, K))
        cap = np.zeros((S, K))
        slo = np.ones(K)
        for j, wid in enumerate(wids):
            spec = extra if (extra is not None and wid == extra_id) else self.book.specs[wid]
            tp, mu, bmax = self._model(wid, spec, gpu_types)
            services.append(ServiceInfo(spec.name, spec.model, spec.slo.ttft_ms / 1e3, spec.slo.tpot_ms / 1e3,
                                        spec.min_replicas, spec.max_replicas, tp, mu, bmax))
            for i, s in enumerate(local):
                best = max((mu[gi[p.gpu_type]] for p in (s.gpu_pools or s.site.gpu_pools) if tp[gi[p.gpu_type]]),
                           default=float(mu.max()) if len(mu) else 0.0)
                for x in s.services:
                    if x.workload_id == wid:
                        reps[i, j] = x.replicas
                        dem[i, j] = x.request_rate_rps
                        load[i, j] = x.utilization
                        cap[i, j] = x.replicas * best
            agg = summaries.get(wid)
            if agg is not None:  # the rest of the pool: pool-wide figure less the local rows
                reps[-1, j] = max(0.0, agg.replicas - reps[:-1, j].sum())
                dem[-1, j] = max(0.0, agg.request_rate_rps - dem[:-1, j].sum())
                cap[-1, j] = reps[-1, j] * (float(mu.max()) if len(mu) else 0.0)
                slo[j] = agg.requests_ok / agg.requests if agg.requests > 0 else 1.0
            if extra is not None and wid == extra_id:
                ingress = ids.index(spec.ingress_site_id) if spec.ingress_site_id in ids else S - 1
                dem[ingress, j] = spec.expected_rate_rps
        job_offers = []
        for o in offers:
            fits = np.array([(not o.allowed_gpu_types or t in o.allowed_gpu_types)
                             and self._hbm(site, t) >= o.min_hbm_gb for t in gpu_types], bool)
            job_offers.append(JobOffer(o.workload_id, int(o.units), int(o.gpus_per_unit), fits, 0.0, ""))
        training = np.zeros(S)
        for i, s in enumerate(local):
            for j in s.jobs:
                spec = self.book.specs.get(j.workload_id)
                if isinstance(spec, common.TrainingJobSpec):
                    training[i] += j.shards_running * spec.gpus_per_shard
        view = PoolView(
            time_s=snap.sim_time_s if snap else 0.0, tick_s=1.0, site_ids=[*ids, "_rest"], site_up=up,
            latency_s=self._latency, bandwidth_gbps=np.zeros((S, S)), gpu_types=gpu_types,
            total_gpus=total, free_gpus=free, services=services, ready=reps.copy(), replicas=reps,
            capacity_rps=cap, demand_rps=dem, load=load, slo_recent=slo, overflow=np.full((S, K), -1),
            offers=job_offers, training_gpus=training, population=np.full(S, 1.0 / S),
        )
        return view, wids

    @staticmethod
    def _hbm(site: common.Site, gpu_type: str) -> float:
        return next((p.hbm_gb for p in site.gpu_pools if p.gpu_type == gpu_type and p.hbm_gb), 1e9)

    def decide(self, view: PoolView) -> tuple[np.ndarray, np.ndarray]:
        self.decisions += 1
        delta, accept, _overflow = self.runtime.decide_site(view, 0)
        return delta, accept

    # --- the SitePolicy interface ---------------------------------------------------------------
    def answer_round(self, offers, site: common.Site, telemetry: site_pb.SiteTelemetry | None,
                     available: bool) -> list[tuple[int, str, float, str]]:
        out: list[tuple[int, str, float, str] | None] = [None] * len(offers)
        training = [(i, o) for i, o in enumerate(offers) if o.kind == common.WORKLOAD_KIND_TRAINING_JOB]
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

    def scale(self, snapshot: perception_pb2.Snapshot, site: common.Site,
              telemetry: site_pb.SiteTelemetry | None, now: float) -> list[ScaleWish]:
        if telemetry is None or not telemetry.available:
            return []
        self.snapshot = snapshot
        view, wids = self.view(site, telemetry, True)
        if not wids:
            return []
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
            wishes.append(ScaleWish(wid, want, best_type, f"marl {'+1' if d > 0 else '-1'}"))
        return wishes
