"""The digital twin: a trace-driven simulator of a CNC pool, advanced in control ticks.

Each tick the twin (1) applies failures and repairs, (2) takes decisions — either a policy's
`Actions` (replica deltas per site and service, bids for offered training jobs, an overflow target
per site and service) through the same arbitration the live scheduler uses, or direct commands from
the live brain (`set_replicas`, `place_job`), (3) serves the tick's inference requests in bulk with
numpy — routing, queueing, prefill and decode from `costmodel` — and (4) advances training jobs.

Requests are never Python objects: a tick's requests of one service are slices of arrays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from cncbrain.twin import costmodel
from cncbrain.twin.pool import build_pool, ingress_weights
from cncbrain.twin.scenario import InferenceSpec, Scenario
from cncbrain.twin.traces import JobSpec, jobs_from_trace, replay
from cncbrain.twin.view import Actions, JobOffer, PoolStats, PoolView, ServiceInfo

log = logging.getLogger(__name__)

MAX_OFFERS = 2
"""Pending training jobs offered to the sites each tick (head of the queue)."""
ROUTE_UTIL = 0.80
"""Routing fills a site's replicas up to this utilisation (80 %: beyond it the queueing delay of a few replicas passes the TTFT SLOs) before sending work elsewhere."""
DROP_FACTOR = 8.0
"""A request whose queueing delay would exceed max(30 s, DROP_FACTOR × TTFT SLO) is dropped."""


def _first_above(cum: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each i: how many entries of cum[rows[i]] are ≤ u[i] (rows of `cum` are non-decreasing),
    i.e. the column whose cumulative share first exceeds u[i]. One binary search per request,
    grouped by row, instead of comparing every request with every column."""
    out = np.empty(len(u), dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(cum.shape[0] + 1))
    for r in np.nonzero(np.diff(bounds))[0]:
        idx = order[bounds[r]:bounds[r + 1]]
        out[idx] = np.searchsorted(cum[r], u[idx], side="right")
    return out


@dataclass
class _Service:
    """An inference service's static data and per-type serving constants."""

    spec: InferenceSpec
    model: costmodel.ModelSpec
    tp: np.ndarray  # [G] tensor-parallel degree per GPU type (0 = does not fit)
    mu: np.ndarray  # [G] requests/s one replica sustains at full utilisation
    work_s: np.ndarray  # [G] replica-seconds of work per mean request
    bmax: np.ndarray  # [G] decode batch limit
    startup_s: float
    mean_prompt: float
    mean_output: float
    # the replayed trace for this run
    t: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    ingress: np.ndarray
    cursor: int = 0
    active: bool = True
    trace_end_s: float = 0.0
    """Emulated time up to which `t` holds the replayed requests (a `trace_window_s` twin extends it)."""


class JobState(StrEnum):
    """Where a training job of the twin is."""

    QUEUED = "queued"
    """Not arrived yet (its trace arrival is later than the twin's time)."""
    PENDING = "pending"
    """Arrived, waiting for a placement (offered every tick)."""
    RUNNING = "running"
    """Placed: every shard at a site, training."""
    DONE = "done"
    """Trained all its tokens."""


@dataclass
class _Job:
    spec: JobSpec
    state: JobState = JobState.QUEUED
    placement: list[tuple[int, int]] = field(default_factory=list)  # (site, gpu type) per shard
    rate: float = 0.0  # tokens/s while running
    wan_bytes_per_s: float = 0.0
    progress: float = 0.0
    checkpoint: float = 0.0
    since_ckpt_s: float = 0.0
    lost: float = 0.0
    finish_s: float | None = None


@dataclass
class TickReport:
    """What happened in one tick (used by the env, telemetry and live views)."""

    time_s: float
    requests: np.ndarray  # [K]
    met_slo: np.ndarray  # [K]
    dropped: np.ndarray  # [K]
    load: np.ndarray  # [S, K] utilisation of the site's replicas
    demand_rps: np.ndarray  # [S, K] ingress demand
    served_rps: np.ndarray  # [S, K] requests served at the site
    training_tokens: float
    cost_usd: float
    # per site, for credit assignment in training (agents.cnc_pool_v0 reward="site"): requests
    # counted at the site that served them (at their ingress when nothing could), those that met
    # their SLOs, training tokens done by the shards at the site, cost of the GPUs allocated there
    site_requests: np.ndarray | None = None  # [S]
    site_met: np.ndarray | None = None  # [S]
    site_tokens: np.ndarray | None = None  # [S]
    site_cost: np.ndarray | None = None  # [S]


def pool_rng(seed: int) -> np.random.Generator:
    """The generator a twin of `seed` builds its pool (sampled inventories) with."""
    return np.random.default_rng(seed + 7919)


class Twin:
    """A CNC pool under a scenario, deterministic for a given seed."""

    def __init__(self, scenario: Scenario, seed: int | None = None, duration_s: float | None = None, *,
                 keep_history: bool = True, trace_window_s: float | None = None):
        """keep_history: keep every tick's report and every request's latency (the evaluation's
        metrics); False for a twin that runs for ever (the live emulator), whose memory then stays
        flat. trace_window_s: replay each service's trace a window at a time instead of its whole
        horizon at once (the emulator; None: whole, as the evaluations replay it)."""
        self.keep_history = keep_history
        self.trace_window_s = trace_window_s
        self._free_slots: list[int] = []
        """Columns of removed services, given to the next added one (the arrays do not grow)."""
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.rng = np.random.default_rng(self.seed)
        self.duration_s = float(duration_s or scenario.duration_s)
        self.tick_s = float(scenario.tick_s)
        self.pool = build_pool(scenario, pool_rng(self.seed))
        net = self.pool.net
        self.S = net.size
        self.site_ids = list(net.names)
        self.site_index = {n: i for i, n in enumerate(self.site_ids)}
        self.gpu_types = self.pool.gpu_types
        self.G = len(self.gpu_types)
        self.gpus = [costmodel.gpu(g) for g in self.gpu_types]
        self.total = self.pool.inventory.astype(np.int64)  # [S, G]
        self.price = np.array([g.price_hr for g in self.gpus])
        self.tflops = np.array([g.tflops for g in self.gpus])
        self.gpu_cols = costmodel.GpuColumns.of(self.gpus)
        self.latency = net.latency_s
        self.bandwidth = net.bandwidth_gbps
        self.time_s = 0.0
        self.down_until = np.zeros(self.S)
        self.failures = sorted(
            ((self.site_index[f.site], f.at_s, f.duration_s) for f in scenario.failures), key=lambda x: x[1]
        )
        self._fail_cursor = 0
        # inference
        self.services: list[_Service] = []
        self.service_index: dict[str, int] = {}
        self.ready = np.zeros((self.S, 0, self.G), dtype=np.int64)
        self.starting: list[tuple[float, int, int, int]] = []  # (ready_at, site, service, type)
        self.overflow = np.full((self.S, 0), -1, dtype=np.int64)
        self.backlog = np.zeros((self.S, 0))  # replica-seconds of queued work
        self.shard_gpus_used = np.zeros((self.S, self.G), dtype=np.int64)
        for spec in scenario.inference:
            self.add_service(spec)
            self._warm_start(self.service_index[spec.name])
        # training
        self.jobs: list[_Job] = []
        self.job_index: dict[str, int] = {}
        jobs = self._scenario_jobs()
        for j in jobs:
            self.submit_job(j)
        # accounting
        self._ttft: list[np.ndarray] = []
        self._tpot: list[np.ndarray] = []
        self._lat_weight: list[int] = []  # request weight of each _ttft/_tpot chunk
        self.n_requests = 0
        self.n_met = 0
        self.cost_usd = 0.0
        self.busy_gpu_s = 0.0
        self.avail_gpu_s = 0.0
        self.wan_bytes = 0.0
        self.history: list[TickReport] = []
        self._last: TickReport | None = None
        self._at_boundary()  # failures and arrivals at time 0

    # ---------------------------------------------------------------- set-up helpers
    def _scenario_jobs(self) -> list[JobSpec]:
        tr = self.scenario.training
        jobs: list[JobSpec] = []
        if tr.trace == "alibaba" and tr.jobs_per_hour > 0 and tr.load_scale > 0:
            n = int(round(tr.jobs_per_hour * tr.load_scale * self.duration_s / 3600.0))
            jobs += jobs_from_trace(
                n, self.duration_s, self.rng, gpu_scale=tr.gpu_scale,
                checkpoint_interval_s=tr.checkpoint_interval_s, max_runtime_s=tr.max_runtime_s,
            )
        ref = costmodel.gpu("A100-80GB")
        for e in tr.jobs:
            m = costmodel.model(e.model)
            shard = max(costmodel.min_train_gpus(m, ref), 1)
            n_shards = max(1, e.gpus // shard)
            rate = costmodel.shard_tokens_per_s(m, ref, shard) * n_shards
            jobs.append(JobSpec(e.id, e.arrival_s, e.model, n_shards, shard, rate * e.runtime_s,
                                float(2**20 if m.params_b < 10 else 2**22), e.runtime_s, e.checkpoint_interval_s))
        return sorted(jobs, key=lambda j: j.arrival_s)

    def _ingress_weights(self, spec: InferenceSpec) -> np.ndarray:
        return ingress_weights(self.pool, spec.ingress, f"inference {spec.name}")

    def add_service(self, spec: InferenceSpec) -> int:
        """Add an inference service; its demand replays the spec's trace from now on."""
        if spec.name in self.service_index and self.services[self.service_index[spec.name]].active:
            raise ValueError(f"service {spec.name!r} exists")
        m = costmodel.model(spec.model)
        if self.trace_window_s is None:
            end, trace = self.duration_s, replay(spec.trace, self.duration_s, spec.rate_scale / spec.request_weight,
                                                 self.rng)
        else:
            end = min(self.duration_s, self.time_s + self.trace_window_s)
            trace = replay(spec.trace, end, spec.rate_scale / spec.request_weight, self.rng, start_s=self.time_s)
        ingress = self.rng.choice(self.S, size=len(trace), p=self._ingress_weights(spec))
        start = int(np.searchsorted(trace.t, self.time_s))
        mp, mo = (float(trace.prompt.mean()), float(trace.output.mean())) if len(trace.t) else (1.0, 1.0)
        tp, bmax, work = costmodel.replica_figures(m, self.gpus, spec.precision, mp, mo)
        svc = _Service(spec, m, tp, np.where(np.isfinite(work), 1.0 / work, 0.0), work, bmax,
                       costmodel.replica_startup_s(m, spec.precision), mp, mo,
                       trace.t, trace.prompt, trace.output, ingress, cursor=start, trace_end_s=end)
        if self._free_slots:  # the column of a removed service
            k = self._free_slots.pop()
            self.services[k] = svc
            self.ready[:, k, :] = 0
            self.overflow[:, k] = -1
            self.backlog[:, k] = 0.0
        else:
            k = len(self.services)
            self.services.append(svc)
            self.ready = np.concatenate([self.ready, np.zeros((self.S, 1, self.G), np.int64)], axis=1)
            self.overflow = np.concatenate([self.overflow, np.full((self.S, 1), -1, np.int64)], axis=1)
            self.backlog = np.concatenate([self.backlog, np.zeros((self.S, 1))], axis=1)
        self.service_index[spec.name] = k
        return k

    def _extend_trace(self, svc: _Service, until_s: float) -> None:
        """Replay the next window(s) of a windowed service's trace, dropping what was served."""
        end = svc.trace_end_s
        while end < min(until_s, self.duration_s):
            new_end = min(self.duration_s, end + (self.trace_window_s or self.duration_s))
            spec = svc.spec
            trace = replay(spec.trace, new_end, spec.rate_scale / spec.request_weight, self.rng, start_s=end)
            ingress = self.rng.choice(self.S, size=len(trace), p=self._ingress_weights(spec))
            c = svc.cursor
            svc.t, svc.prompt = np.concatenate([svc.t[c:], trace.t]), np.concatenate([svc.prompt[c:], trace.prompt])
            svc.output, svc.ingress = np.concatenate([svc.output[c:], trace.output]), np.concatenate([svc.ingress[c:], ingress])
            svc.cursor = 0
            end = new_end
        svc.trace_end_s = end

    def _warm_start(self, k: int) -> None:
        """A scenario's services begin with their min_replicas serving, at the most populous sites
        with room (the pool was running before the episode starts)."""
        order = np.argsort(-self.pool.population, kind="stable")
        placed = 0
        while placed < self.services[k].spec.min_replicas:
            progress = False
            for s in order:
                free = self.free_gpus()
                g = self._best_type(k, free[s])
                if g >= 0:
                    self.ready[s, k, g] += 1
                    placed += 1
                    progress = True
                    if placed == self.services[k].spec.min_replicas:
                        break
            if not progress:
                break

    def remove_service(self, name: str) -> None:
        k = self.service_index[name]
        svc = self.services[k]
        svc.active = False
        self.ready[:, k, :] = 0
        self.starting = [s for s in self.starting if s[2] != k]
        if not self.keep_history:  # nobody reports on it later: its column and trace are free
            del self.service_index[name]
            empty = np.zeros(0)
            svc.t, svc.prompt, svc.output, svc.ingress, svc.cursor = empty, empty, empty, np.zeros(0, np.int64), 0
            self._free_slots.append(k)

    def forget_job(self, job_id: str) -> None:
        """Drop a job that is done (a twin that runs for ever: its list would only grow)."""
        i = self.job_index.pop(job_id, None)
        if i is None:
            return
        job = self.jobs[i]
        if job.state == JobState.RUNNING:
            self._stop_job(job, lose=False)
        last = self.jobs.pop()
        if i < len(self.jobs):
            self.jobs[i] = last
            self.job_index[last.spec.job_id] = i

    def submit_job(self, spec: JobSpec) -> None:
        if spec.job_id in self.job_index:
            raise ValueError(f"job {spec.job_id!r} exists")
        self.job_index[spec.job_id] = len(self.jobs)
        job = _Job(spec)
        if spec.arrival_s <= self.time_s:
            job.state = JobState.PENDING  # it has arrived: offer it from this tick on
        self.jobs.append(job)

    def cancel_job(self, job_id: str) -> None:
        """End a job for good (cancelled, or finished as far as the live brain is concerned): its
        GPUs are freed, its progress so far is kept."""
        job = self.jobs[self.job_index[job_id]]
        if job.state == JobState.RUNNING:
            self._stop_job(job, lose=False)
        job.state = JobState.DONE

    # ---------------------------------------------------------------- capacity bookkeeping
    @property
    def K(self) -> int:
        return len(self.services)

    def site_up(self) -> np.ndarray:
        return self.down_until <= self.time_s

    def _tp_matrix(self) -> np.ndarray:
        return np.array([s.tp for s in self.services], dtype=np.int64).reshape(self.K, self.G)

    def replicas_by_type(self) -> np.ndarray:
        """Ready + starting replicas, [S, K, G]."""
        r = self.ready.copy()
        for _, s, k, g in self.starting:
            r[s, k, g] += 1
        return r

    def used_gpus(self) -> np.ndarray:
        used = (self.replicas_by_type() * self._tp_matrix()[None, :, :]).sum(axis=1) if self.K else 0
        return used + self.shard_gpus_used

    def free_gpus(self) -> np.ndarray:
        free = self.total - self.used_gpus()
        free[~self.site_up()] = 0
        return np.maximum(free, 0)

    # ---------------------------------------------------------------- direct commands (live brain)
    def _best_type(self, k: int, free_s: np.ndarray) -> int:
        svc = self.services[k]
        ok = (svc.tp > 0) & (free_s >= svc.tp)
        if not ok.any():
            return -1
        return int(np.argmax(np.where(ok, svc.mu, -1.0)))

    def add_replica(self, k: int, s: int, free: np.ndarray | None = None) -> bool:
        free = self.free_gpus() if free is None else free
        if not self.site_up()[s]:
            return False
        g = self._best_type(k, free[s])
        if g < 0:
            return False
        free[s, g] -= self.services[k].tp[g]
        self.starting.append((self.time_s + self.services[k].startup_s, s, k, g))
        return True

    def remove_replica(self, k: int, s: int) -> bool:
        for i in range(len(self.starting) - 1, -1, -1):
            if self.starting[i][1] == s and self.starting[i][2] == k:
                self.starting.pop(i)
                return True
        types = np.nonzero(self.ready[s, k])[0]
        if len(types) == 0:
            return False
        g = types[np.argmin(self.services[k].mu[types])]  # drop the slowest first
        self.ready[s, k, g] -= 1
        return True

    def set_replicas(self, service: str, site: str, n: int) -> int:
        """Make `service` have `n` replicas at `site` (as far as free GPUs allow); returns the count."""
        k, s = self.service_index[service], self.site_index[site]
        cur = int(self.replicas_by_type()[s, k].sum())
        while cur > n and self.remove_replica(k, s):
            cur -= 1
        free = self.free_gpus()
        while cur < n and self.add_replica(k, s, free):
            cur += 1
        return cur

    def _shard_capacity(self, job: _Job, s: int, free_s: np.ndarray) -> tuple[int, int]:
        """How many shards of `job` site `s` can host and on which GPU type (fastest that fits)."""
        m = costmodel.model(job.spec.model)
        best, count = -1, 0
        for g in np.argsort(-self.tflops):
            if costmodel.train_memory_fits(m, self.gpus[g], job.spec.shard_gpus):
                c = int(free_s[g] // job.spec.shard_gpus)
                if c > 0:
                    return int(g), c
        return best, count

    def place_job(self, job_id: str, sites: list[str] | list[int], free: np.ndarray | None = None) -> bool:
        """Gang-place a pending job: one entry per shard naming its site. All shards or none."""
        job = self.jobs[self.job_index[job_id]]
        if job.state != JobState.PENDING or len(sites) != job.spec.n_shards:
            return False
        idx = [self.site_index[x] if isinstance(x, str) else int(x) for x in sites]
        free = self.free_gpus() if free is None else free
        trial = free.copy()
        placement = []
        for s in idx:
            g, c = self._shard_capacity(job, s, trial[s])
            if c <= 0:
                return False
            trial[s, g] -= job.spec.shard_gpus
            placement.append((s, g))
        free[:] = trial
        self._start_job(job, placement)
        return True

    def _start_job(self, job: _Job, placement: list[tuple[int, int]]) -> None:
        m = costmodel.model(job.spec.model)
        sites = sorted({s for s, _ in placement})
        if len(sites) > 1:
            sub = np.ix_(sites, sites)
            bw = float(np.min(self.bandwidth[sub][~np.eye(len(sites), dtype=bool)]))
            lat = float(np.max(self.latency[sub]))
        else:
            bw = costmodel.INTRA_SITE_BW_GBPS * job.spec.shard_gpus
            lat = 5e-6
        step = costmodel.train_step_s(m, job.spec.tokens_per_step, job.spec.shard_gpus,
                                    [self.gpus[g] for _, g in placement], max(bw, 1e-9), lat)
        job.rate = job.spec.tokens_per_step / step
        n = len(placement)
        # ring all-reduce of 2 B/param: each of the cross-site hops carries 2(n−1)/n·S per step
        cross = len(sites) if len(sites) > 1 else 0
        job.wan_bytes_per_s = cross * 2 * (n - 1) / n * 2.0 * m.params / step
        job.placement = placement
        job.state = JobState.RUNNING
        job.since_ckpt_s = 0.0
        for s, g in placement:
            self.shard_gpus_used[s, g] += job.spec.shard_gpus

    def _stop_job(self, job: _Job, lose: bool) -> None:
        for s, g in job.placement:
            self.shard_gpus_used[s, g] -= job.spec.shard_gpus
        job.placement = []
        job.rate = 0.0
        job.wan_bytes_per_s = 0.0
        if lose:
            job.lost += job.progress - job.checkpoint
            job.progress = job.checkpoint
            job.state = JobState.PENDING

    def fail_site(self, site: str | int, duration_s: float) -> None:
        """Take a site down now: its replicas vanish, its jobs fall back to their last checkpoint."""
        s = self.site_index[site] if isinstance(site, str) else int(site)
        self.down_until[s] = max(self.down_until[s], self.time_s + duration_s)
        self.ready[s] = 0
        self.backlog[s] = 0.0
        self.starting = [x for x in self.starting if x[1] != s]
        for job in self.jobs:
            if job.state == JobState.RUNNING and any(p[0] == s for p in job.placement):
                self._stop_job(job, lose=True)

    # ---------------------------------------------------------------- the policy path
    def view(self) -> PoolView:
        """What a policy sees before it decides this tick."""
        last = self._last
        K = self.K
        reps = self.replicas_by_type()
        offers: list[JobOffer] = []
        pending, pending_gpus = 0, 0.0
        for job in self.jobs:
            if job.state == JobState.PENDING:
                pending += 1
                pending_gpus += job.spec.n_shards * job.spec.shard_gpus
                if len(offers) < MAX_OFFERS:
                    m = costmodel.model(job.spec.model)
                    fits = np.array([costmodel.train_memory_fits(m, g, job.spec.shard_gpus) for g in self.gpus])
                    offers.append(JobOffer(job.spec.job_id, job.spec.n_shards, job.spec.shard_gpus, fits,
                                           self.time_s - job.spec.arrival_s, job.spec.model))
        up, free, replicas = self.site_up(), self.free_gpus(), reps.sum(axis=2)
        capacity = (reps * np.array([s.mu for s in self.services]).reshape(K, self.G)[None]).sum(axis=2)
        demand = last.demand_rps if last is not None else np.zeros((self.S, K))
        training = self.shard_gpus_used.sum(axis=1)
        return PoolView(
            time_s=self.time_s,
            tick_s=self.tick_s,
            site_ids=self.site_ids,
            site_up=up,
            latency_s=self.latency,
            bandwidth_gbps=self.bandwidth,
            gpu_types=self.gpu_types,
            total_gpus=self.total,
            free_gpus=free,
            services=[ServiceInfo(s.spec.name, s.spec.model, s.spec.slo.ttft_s, s.spec.slo.tpot_s,
                                  s.spec.min_replicas, s.spec.max_replicas, s.tp.copy(), s.mu.copy(), s.bmax.copy(),
                                  s.active)
                      for s in self.services],
            ready=self.ready.sum(axis=2),
            replicas=replicas,
            capacity_rps=capacity,
            demand_rps=demand,
            load=last.load if last is not None else np.zeros((self.S, K)),
            slo_recent=np.where(last.requests > 0, last.met_slo / np.maximum(last.requests, 1), 1.0)
            if last is not None else np.ones(K),
            overflow=self.overflow.copy(),
            offers=offers,
            training_gpus=training,
            population=self.pool.population,
            pool=PoolStats.of(up, self.total, free, training, replicas, pending, pending_gpus, demand, capacity,
                              self.latency, self._tp_matrix(), self.pool.population),
        )

    def apply(self, actions: Actions) -> None:
        """Turn the sites' decisions into changes, as the live scheduler arbitrates them: removals
        first (never below a service's min_replicas), then additions while GPUs are free (never
        above max_replicas), then gang placement of offered jobs to the highest bidders."""
        up = self.site_up()
        delta = np.asarray(actions.replica_delta, dtype=np.int64)
        counts = self.replicas_by_type().sum(axis=2)
        totals = counts.sum(axis=0)
        for k, svc in enumerate(self.services):
            if not svc.active:
                continue
            for s in np.nonzero(delta[:, k] < 0)[0].tolist():
                for _ in range(int(-delta[s, k])):
                    if totals[k] <= svc.spec.min_replicas or not self.remove_replica(k, s):
                        break
                    totals[k] -= 1
        free = self.free_gpus()
        order = np.argsort(-delta, axis=None, kind="stable")
        for flat in order:
            s, k = divmod(int(flat), self.K)
            d = int(delta[s, k])
            if d <= 0:
                break
            svc = self.services[k]
            if not svc.active or not up[s]:
                continue
            for _ in range(d):
                if totals[k] >= svc.spec.max_replicas or not self.add_replica(k, s, free):
                    break
                totals[k] += 1
        if actions.overflow is not None:
            ov = np.asarray(actions.overflow, dtype=np.int64)
            self.overflow = np.where((ov >= 0) & (ov < self.S), ov, -1)
        if actions.accept is not None:
            offers = self.view_offers()
            bids = np.asarray(actions.accept, dtype=float)
            for o, job in enumerate(offers[: bids.shape[1] if bids.ndim == 2 else 0]):
                b = bids[:, o]
                sites = [s for s in np.argsort(-b, kind="stable") if b[s] > 0 and up[s]]
                plan: list[int] = []
                trial = free.copy()
                for s in sites:
                    g, c = self._shard_capacity(job, s, trial[s])
                    take = min(c, job.spec.n_shards - len(plan))
                    if take > 0:
                        plan += [s] * take
                        trial[s, g] -= take * job.spec.shard_gpus
                    if len(plan) == job.spec.n_shards:
                        break
                if len(plan) == job.spec.n_shards:
                    self.place_job(job.spec.job_id, plan, free)

    def view_offers(self) -> list[_Job]:
        out = []
        for job in self.jobs:
            if job.state == JobState.PENDING:
                out.append(job)
                if len(out) == MAX_OFFERS:
                    break
        return out

    # ---------------------------------------------------------------- the tick
    def done(self) -> bool:
        return self.time_s >= self.duration_s - 1e-9

    def step(self, actions: Actions | None = None) -> TickReport:
        """Advance one tick, after applying `actions` (if any). Failures, repairs, job arrivals and
        replicas finishing their start-up take effect at the tick boundary, before the next `view()`,
        so a policy always decides on the pool as it is."""
        if actions is not None:
            self.apply(actions)
        t0, dt = self.time_s, min(self.tick_s, self.duration_s - self.time_s)
        report = self._serve(t0, dt)
        report.training_tokens, report.site_tokens = self._train(t0, dt)
        # cost and utilisation of what is allocated during the tick
        reps = self.replicas_by_type()
        tpm = self._tp_matrix()
        alloc = (reps * tpm[None]).sum(axis=1) + self.shard_gpus_used if self.K else self.shard_gpus_used.copy()
        site_cost = (alloc * self.price[None, :]).sum(axis=1) * dt / 3600.0
        report.site_cost = site_cost
        cost = float(site_cost.sum())
        busy_inf = (self.ready * tpm[None]).sum(axis=2) * np.minimum(report.load, 1.0) if self.K else 0.0
        self.busy_gpu_s += float((np.sum(busy_inf) + self.shard_gpus_used.sum()) * dt)
        self.avail_gpu_s += float(self.total[self.site_up()].sum() * dt)
        self.cost_usd += cost
        report.cost_usd = cost
        self.time_s = t0 + dt
        self._at_boundary()
        self._last = report
        if self.keep_history:
            self.history.append(report)
        return report

    def _at_boundary(self) -> None:
        self._events()
        self._promote_started(self.time_s)

    def _events(self) -> None:
        while self._fail_cursor < len(self.failures) and self.failures[self._fail_cursor][1] <= self.time_s + 1e-9:
            s, _, dur = self.failures[self._fail_cursor]
            self.fail_site(s, dur)
            self._fail_cursor += 1
        for job in self.jobs:
            if job.state == JobState.QUEUED and job.spec.arrival_s <= self.time_s + 1e-9:
                job.state = JobState.PENDING

    def _promote_started(self, now: float) -> None:
        if not self.starting:
            return
        keep = []
        for item in self.starting:
            if item[0] <= now + 1e-9:
                self.ready[item[1], item[2], item[3]] += 1
            else:
                keep.append(item)
        self.starting = keep

    def _route(self, k: int, demand: np.ndarray, cap: np.ndarray, lat_ok: np.ndarray,
               queued_rps: np.ndarray) -> np.ndarray:
        """Fluid routing of one service: local replicas first, then the site's chosen overflow
        neighbour, then the nearest sites with spare capacity; what is left goes to every site with
        replicas in proportion to capacity (they queue). Returns flows [S ingress, S serving]."""
        S = self.S
        flow = np.zeros((S, S))
        spare = np.maximum(cap * ROUTE_UTIL - queued_rps, 0.0)
        local = np.minimum(demand, spare)
        flow[np.arange(S), np.arange(S)] = local
        spare = spare - local
        rest = demand - local
        ov = self.overflow[:, k]
        for i in np.nonzero(rest > 1e-12)[0]:
            j = ov[i]
            if j >= 0 and j != i and spare[j] > 0 and lat_ok[i, j]:
                x = min(rest[i], spare[j])
                flow[i, j] += x
                spare[j] -= x
                rest[i] -= x
            if rest[i] > 1e-12:
                for j in self._near[i]:
                    if spare[j] > 0 and lat_ok[i, j]:
                        x = min(rest[i], spare[j])
                        flow[i, j] += x
                        spare[j] -= x
                        rest[i] -= x
                        if rest[i] <= 1e-12:
                            break
        if rest.sum() > 1e-12 and cap.sum() > 0:
            share = cap / cap.sum()
            flow += rest[:, None] * share[None, :] * lat_ok
        return flow

    def _serve(self, t0: float, dt: float) -> TickReport:
        K, S = self.K, self.S
        site_requests, site_met = np.zeros(S), np.zeros(S)
        rep = TickReport(t0, np.zeros(K, np.int64), np.zeros(K, np.int64), np.zeros(K, np.int64),
                         np.zeros((S, K)), np.zeros((S, K)), np.zeros((S, K)), 0.0, 0.0,
                         site_requests, site_met)
        if not hasattr(self, "_near"):
            self._near = [np.argsort(self.latency[i], kind="stable")[1:] for i in range(S)]
        lat_ok = np.isfinite(self.latency)
        for k, svc in enumerate(self.services):
            if svc.active and svc.trace_end_s < t0 + dt and self.trace_window_s is not None:
                self._extend_trace(svc, t0 + dt)
            lo = svc.cursor
            hi = int(np.searchsorted(svc.t, t0 + dt, side="left"))
            svc.cursor = hi
            if not svc.active or hi <= lo:
                continue
            t, p, o, ing = svc.t[lo:hi], svc.prompt[lo:hi], svc.output[lo:hi], svc.ingress[lo:hi]
            n = hi - lo
            rw = svc.spec.request_weight  # each simulated request stands for rw of the trace
            demand = np.bincount(ing, minlength=S) / dt
            if rw != 1:
                demand = demand * rw
            ready = self.ready[:, k, :]  # [S, G]
            n_rep = ready.sum(axis=1)
            cap = (ready * svc.mu[None, :]).sum(axis=1)
            # work already queued at a site leaves less room for new requests this tick
            queued_rps = self.backlog[:, k] / dt * np.divide(cap, n_rep, out=np.zeros(S), where=n_rep > 0)
            flow = self._route(k, demand, cap, lat_ok, queued_rps)
            lam = flow.sum(axis=0)
            rep.demand_rps[:, k] = demand
            rep.served_rps[:, k] = lam
            # per serving site: dominant GPU type sets the per-request timings
            g_dom = np.argmax(ready * np.where(svc.tp > 0, 1, 0)[None, :], axis=1)
            rho = np.divide(lam, cap, out=np.zeros(S), where=cap > 0)
            rep.load[:, k] = rho
            lam_rep = np.divide(lam, n_rep, out=np.zeros(S), where=n_rep > 0)
            ctx = svc.mean_prompt + svc.mean_output / 2
            tpot_site = np.full(S, np.inf)
            wait0 = np.zeros(S)
            growth = np.zeros(S)
            # every serving site at once, each with its dominant GPU type's figures
            ss = np.nonzero(n_rep > 0)[0]
            g_ss = g_dom[ss]
            gt, tp = self.gpu_cols.take(g_ss), svc.tp[g_ss]
            bmax = svc.bmax[g_ss]
            b = np.ones(len(ss))
            for _ in range(3):  # decode concurrency by Little's law, a fixed point
                step = costmodel.decode_step_s(svc.model, gt, tp, b, ctx, svc.spec.precision)
                b = np.clip(lam_rep[ss] * svc.mean_output * step, 1.0, bmax)
            pre_share = np.minimum(lam_rep[ss] * costmodel.prefill_s(svc.model, gt, tp, svc.mean_prompt,
                                                                   svc.spec.precision), 0.9)
            tpot_site[ss] = step / (1.0 - pre_share)
            # continuous batching: the site is n_rep·bmax slots, each holding a request for
            # work·bmax seconds; Sakasegawa's M/G/c approximation of the queueing delay
            r = np.minimum(rho[ss], 0.98)
            w = svc.work_s[g_ss]
            slots = np.maximum((n_rep[ss] * bmax).astype(np.int64), 1)
            wq = np.where(r > 0, r ** (np.sqrt(2 * (slots + 1)) - 1) / (slots * (1 - r)) * w * bmax, 0.0)
            c = np.maximum(n_rep[ss], 1)
            wait0[ss] = self.backlog[ss, k] / c + wq
            growth[ss] = np.maximum(lam[ss] * w - c, 0.0) / c  # queue growth, seconds of wait per second
            # each request's serving site, drawn from its ingress row of the flow matrix
            tot = flow.sum(axis=1)[ing]
            served = tot > 0
            u = self.rng.random(n) * tot
            j = np.minimum(_first_above(np.cumsum(flow, axis=1), ing, u), S - 1)
            wait = wait0[j] + growth[j] * (t - t0)
            drop_after = max(30.0, DROP_FACTOR * svc.spec.slo.ttft_s)
            dropped = ~served | (wait > drop_after) | ~np.isfinite(tpot_site[j])
            gj = g_dom[j]
            pre = costmodel.prefill_s(svc.model, self.gpu_cols.take(gj), np.maximum(svc.tp[gj], 1), p,
                                    svc.spec.precision)
            ttft = 2 * self.latency[ing, j] + wait + pre
            tpot = tpot_site[j]
            ok = ~dropped & (ttft <= svc.spec.slo.ttft_s) & (tpot <= svc.spec.slo.tpot_s)
            rep.requests[k] = n * rw
            rep.met_slo[k] = int(ok.sum()) * rw
            at = np.where(served, j, ing)
            site_requests += np.bincount(at, minlength=S) * rw
            site_met += np.bincount(at[ok], minlength=S) * rw
            rep.dropped[k] = int(dropped.sum()) * rw
            keep = ~dropped
            if self.keep_history:
                self._ttft.append(ttft[keep])
                self._tpot.append(tpot[keep])
                self._lat_weight.append(rw)
            # backlog carried to the next tick (dropped work leaves the queue)
            c = np.maximum(n_rep, 1)
            w_site = svc.work_s[g_dom]
            new_backlog = np.maximum(self.backlog[:, k] + (lam * np.where(np.isfinite(w_site), w_site, 0) - c) * dt, 0)
            self.backlog[:, k] = np.minimum(new_backlog, drop_after * c) * (n_rep > 0)
            # requests served away from their ingress cross the WAN: prompt + output tokens, 4 B each
            away = keep & (j != ing)
            self.wan_bytes += float(((p[away] + o[away]) * 4).sum()) * rw
        self.n_requests += int(rep.requests.sum())
        self.n_met += int(rep.met_slo.sum())
        return rep

    def _train(self, t0: float, dt: float) -> tuple[float, np.ndarray]:
        """Advance the running jobs; (tokens done, tokens done per site [S], split by shards)."""
        done_tokens = 0.0
        per_site = np.zeros(self.S)
        for job in self.jobs:
            if job.state != JobState.RUNNING:
                continue
            left = job.spec.tokens - job.progress
            run = min(dt, left / job.rate) if job.rate > 0 else dt
            job.progress += job.rate * run
            done_tokens += job.rate * run
            if job.placement:
                share = job.rate * run / len(job.placement)
                for s, _ in job.placement:
                    per_site[s] += share
            self.wan_bytes += job.wan_bytes_per_s * run
            job.since_ckpt_s += run
            if job.since_ckpt_s >= job.spec.checkpoint_interval_s:
                job.checkpoint = job.progress
                job.since_ckpt_s = 0.0
            if job.progress >= job.spec.tokens - 1e-6:
                job.progress = job.spec.tokens
                job.checkpoint = job.progress
                job.finish_s = t0 + run
                self._stop_job(job, lose=False)
                job.state = JobState.DONE
        return done_tokens, per_site

    # ---------------------------------------------------------------- results
    def metrics(self) -> dict[str, float]:
        """The evaluation metrics of docs/twin.md (Metrics) over the horizon so far."""
        ttft = np.concatenate(self._ttft) if self._ttft else np.zeros(0)
        tpot = np.concatenate(self._tpot) if self._tpot else np.zeros(0)
        slo = self.n_met / self.n_requests if self.n_requests else 1.0
        horizon = self.time_s
        ref = costmodel.gpu("A100-80GB")
        demanded = useful = 0.0
        slowdowns = []
        for job in self.jobs:
            if job.spec.arrival_s >= horizon:
                continue
            m = costmodel.model(job.spec.model)
            ideal_rate = costmodel.shard_tokens_per_s(m, ref, job.spec.shard_gpus) * job.spec.n_shards
            demanded += min(job.spec.tokens, ideal_rate * (horizon - job.spec.arrival_s))
            useful += job.progress
            if job.finish_s is not None:
                slowdowns.append((job.finish_s - job.spec.arrival_s) / job.spec.ideal_runtime_s)
        goodput = min(useful / demanded, 1.0) if demanded > 0 else 1.0
        cost_all = float((self.total * self.price[None, :]).sum() * horizon / 3600.0)
        cost_share = self.cost_usd / cost_all if cost_all > 0 else 0.0
        return {
            "score": 0.5 * slo + 0.4 * goodput + 0.1 * (1.0 - cost_share),
            "slo_attainment": slo,
            "ttft_p99_s": self._p99(ttft, self._ttft),
            "tpot_p99_s": self._p99(tpot, self._tpot),
            "training_goodput": goodput,
            "mean_jct_slowdown": float(np.mean(slowdowns)) if slowdowns else float("nan"),
            "gpu_utilization": self.busy_gpu_s / self.avail_gpu_s if self.avail_gpu_s else 0.0,
            "cost_usd": self.cost_usd,
            "wan_gb": self.wan_bytes / 1e9,
        }

    def _p99(self, values: np.ndarray, chunks: list[np.ndarray]) -> float:
        """99th percentile over served requests, each counted by its request weight."""
        if not len(values):
            return 0.0
        if len(set(self._lat_weight)) <= 1:  # one weight for all: the plain percentile
            return float(np.percentile(values, 99))
        weights = np.concatenate([np.full(len(c), w, dtype=float) for c, w in zip(chunks, self._lat_weight, strict=True)])
        order = np.argsort(values, kind="stable")
        cum = np.cumsum(weights[order])
        return float(values[order][np.searchsorted(cum, 0.99 * cum[-1])])

    def slo_series(self) -> tuple[np.ndarray, np.ndarray]:
        """SLO attainment per tick (time s, share met), for plots."""
        t = np.array([r.time_s for r in self.history])
        req = np.array([r.requests.sum() for r in self.history], dtype=float)
        met = np.array([r.met_slo.sum() for r in self.history], dtype=float)
        return t, np.divide(met, req, out=np.ones_like(met), where=req > 0)
