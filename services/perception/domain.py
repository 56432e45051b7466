"""Perception's pure logic: the live picture of the pool (sites, liveness, last telemetry), the
snapshot built from it each tick, and the demand forecaster. No gRPC, no NATS.

Data are carried in the contract's protobuf messages (Site, SiteTelemetry, Snapshot): the snapshot
is a protobuf document end to end, so a parallel set of dataclasses would only add copying.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.site.v1 import events_pb2 as site_pb

UP = common.SITE_STATE_UP
DOWN = common.SITE_STATE_DOWN


@dataclass
class SiteEntry:
    site: common.Site
    state: common.SiteState.ValueType = UP
    last_heartbeat: float = 0.0
    telemetry: site_pb.SiteTelemetry | None = None


@dataclass(frozen=True)
class StateChange:
    site_id: str
    state: common.SiteState.ValueType
    reason: str


class HoltForecaster:
    """Holt's linear exponential smoothing (level + trend) of one rate series.

    level_t = α·x_t + (1−α)(level_{t−1} + trend_{t−1}); trend_t = β(level_t − level_{t−1}) + (1−β)trend_{t−1};
    forecast h ticks ahead = level + h·trend, floored at 0. Cheap, adapts within a few ticks to a
    ramp in the Azure traces, and needs no training; documented in docs/live-brain.md.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1):
            raise ValueError("alpha must be in (0, 1] and beta in [0, 1]")
        self.alpha, self.beta = alpha, beta
        self.level: float | None = None
        self.trend = 0.0
        self.last = 0.0
        self.n = 0

    def update(self, x: float) -> None:
        self.n += 1
        self.last = x
        if self.level is None:
            self.level = x
            return
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.trend

    def predict(self, horizon: int) -> list[float]:
        base = self.level or 0.0
        return [max(0.0, base + h * self.trend) for h in range(1, horizon + 1)]

    @property
    def name(self) -> str:
        return f"holt(alpha={self.alpha},beta={self.beta})"


@dataclass
class PoolPicture:
    """Sites by id with their liveness and last telemetry; folds events in, emits changes."""

    heartbeat_timeout_s: float = 3.0
    forecast_alpha: float = 0.5
    forecast_beta: float = 0.3
    sites: dict[str, SiteEntry] = field(default_factory=dict)
    forecasters: dict[str, HoltForecaster] = field(default_factory=dict)
    sequence: int = 0
    mass_silence_share: float = 0.5
    """More than this share of the up sites silent at once (and at least two) looks like the bus —
    a NATS node failing over, perception's own connection — not like sites failing."""
    hold_s: float = 9.0
    """How long such a silence is waited out before the silent sites are marked down anyway."""
    silent_since: float | None = None
    """When the current mass silence began (None: none)."""

    def register(self, site: common.Site, now: float) -> StateChange | None:
        entry = self.sites.get(site.site_id)
        if entry is None:
            self.sites[site.site_id] = SiteEntry(site=site, state=UP, last_heartbeat=now)
            return StateChange(site.site_id, UP, "registered")
        entry.site = site
        return self.heartbeat(site.site_id, now)

    def restore(self, site: common.Site, now: float) -> None:
        """A site known from the state of record; it must heartbeat within the timeout."""
        self.sites.setdefault(site.site_id, SiteEntry(site=site, state=UP, last_heartbeat=now))

    def heartbeat(self, site_id: str, now: float) -> StateChange | None:
        entry = self.sites.get(site_id)
        if entry is None:
            return None
        entry.last_heartbeat = max(entry.last_heartbeat, now)
        if entry.state == DOWN:
            entry.state = UP
            return StateChange(site_id, UP, "heartbeats resumed")
        return None

    def telemetry(self, t: site_pb.SiteTelemetry) -> bool:
        entry = self.sites.get(t.site_id)
        if entry is None:
            return False
        entry.telemetry = t
        return True

    def check(self, now: float) -> list[StateChange]:
        """Sites silent for longer than the timeout go DOWN — unless most of the pool went silent at
        once (see `mass_silence_share`): that is waited out for `hold_s`, as a bus failover."""
        up = [e for e in self.sites.values() if e.state == UP]
        overdue = [e for e in up if now - e.last_heartbeat > self.heartbeat_timeout_s]
        if len(overdue) >= 2 and len(overdue) > self.mass_silence_share * len(up):
            if self.silent_since is None:
                self.silent_since = now
            if now - self.silent_since < self.hold_s:
                return []
        elif not overdue:
            self.silent_since = None
        changes = []
        for entry in overdue:
            entry.state = DOWN
            silent = now - entry.last_heartbeat
            changes.append(StateChange(entry.site.site_id, DOWN, f"no heartbeat for {silent:.1f} s"))
        return changes

    def bus_back(self, now: float) -> None:
        """Perception's own connection came back: what it could not hear meanwhile is no sign of the
        sites; each gets a full timeout from now."""
        for entry in self.sites.values():
            entry.last_heartbeat = max(entry.last_heartbeat, now)

    @property
    def holding(self) -> bool:
        """A mass silence is being waited out."""
        return self.silent_since is not None

    def service_rates(self) -> dict[str, float]:
        """Pool-wide request rate per inference service from the sites' last telemetry."""
        rates: dict[str, float] = {}
        for entry in self.sites.values():
            if entry.telemetry is None:
                continue
            for load in entry.telemetry.services:
                rates[load.workload_id] = rates.get(load.workload_id, 0.0) + load.request_rate_rps
        return rates

    def site_status(self, entry: SiteEntry) -> ppb.SiteStatus:
        status = ppb.SiteStatus(site=entry.site, state=entry.state)
        status.last_heartbeat.FromNanoseconds(int(entry.last_heartbeat * 1e9))
        t = entry.telemetry
        if t is not None:
            status.gpu_utilization = t.gpu_utilization
            status.services.extend(t.services)
            status.jobs.extend(t.jobs)
            status.gpu_pools.extend(t.gpu_pools)
        else:
            status.gpu_pools.extend(entry.site.gpu_pools)
        return status

    def tick(self, now: float) -> ppb.Snapshot:
        """Fold the last telemetry into a new snapshot and feed the forecasters."""
        self.sequence += 1
        for workload_id, rate in self.service_rates().items():
            self.forecasters.setdefault(
                workload_id, HoltForecaster(self.forecast_alpha, self.forecast_beta)
            ).update(rate)
        snap = ppb.Snapshot(sequence=self.sequence)
        snap.taken_at.FromNanoseconds(int(now * 1e9))
        for site_id in sorted(self.sites):
            snap.sites.append(self.site_status(self.sites[site_id]))
        snap.sites_up = sum(1 for e in self.sites.values() if e.state == UP)
        summary: dict[str, ppb.ServiceSummary] = {}
        for entry in self.sites.values():
            if entry.telemetry is None or entry.state != UP:
                continue
            for load in entry.telemetry.services:
                agg = summary.get(load.workload_id)
                if agg is None:
                    agg = summary[load.workload_id] = ppb.ServiceSummary(workload_id=load.workload_id)
                agg.replicas += load.replicas
                agg.request_rate_rps += load.request_rate_rps
                agg.requests += load.requests
                agg.requests_ok += load.requests_ok
        snap.services.extend(summary[w] for w in sorted(summary))
        times = [e.telemetry.sim_time_s for e in self.sites.values() if e.telemetry is not None]
        snap.sim_time_s = max(times, default=0.0)
        return snap

    def forecast(self, workload_id: str, horizon: int) -> ppb.Forecast | None:
        f = self.forecasters.get(workload_id)
        if f is None:
            return None
        return ppb.Forecast(
            workload_id=workload_id,
            current_rps=f.last,
            predicted_rps=f.predict(horizon),
            model=f.name,
            observations=f.n,
        )
