"""Perception's NATS side: consumes site registrations (durable), heartbeats and telemetry (core),
publishes site state changes (JetStream) and a snapshot every tick (core); keeps registered sites
in the `cnc-sites` KV bucket so a restart remembers them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cncbrain import aio, metrics
from cncbrain.bus import KV_SITES, Bus, Event, subjects
from cncbrain.bus.streams import KV_GOVERNANCE
from cncbrain.signing import verifier_from_env
from services.perception.domain import PoolPicture, StateChange
from services.perception.enrollment import Enrollments

log = logging.getLogger(__name__)


class PerceptionEvents:
    def __init__(self, bus: Bus, picture: PoolPicture, tick_s: float) -> None:
        self.bus = bus
        self.picture = picture
        self.tick_s = tick_s
        self.watchers: set[asyncio.Queue[ppb.Snapshot]] = set()
        self.latest = ppb.Snapshot()
        self.on_tick: list[Callable[[ppb.Snapshot], None]] = []
        """Called with each new snapshot (the web page's history)."""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        verifier = verifier_from_env()
        self.enrollments = Enrollments(verifier) if verifier is not None else None
        """The operator's enrolled sites (None: a brain without credentials, every site counts)."""
        self.pending: dict[str, common.Site] = {}
        """Registrations of sites not enrolled (yet): they count once enrolled."""

    async def start(self) -> None:
        if self.enrollments is not None:
            await self.enrollments.start(await self.bus.kv(KV_GOVERNANCE))
            self.enrollments.take_changed()
        now = time.time()
        for key, (value, _) in (await self.bus.retrying(lambda: self.bus.kv_items(KV_SITES), "read the sites")).items():
            if not value:
                continue
            try:
                site = common.Site.FromString(value)
            except DecodeError:  # left in the bucket untouched; the site registers again when its agent starts
                log.error("site record %s in %s is not a Site (%d bytes); skipped", key, KV_SITES, len(value))
                continue
            if self.enrollments is not None:
                if site.site_id not in self.enrollments.terms:
                    continue
                site = self.enrollments.bound_site(site)
            self.picture.restore(site, now)
        self.bus.on_reconnect.append(lambda: self.picture.bus_back(time.time()))
        await self.bus.subscribe(subjects.SITE_REGISTERED, self.on_registered, consumer="perception-sites", durable=True)
        await self.bus.subscribe(subjects.SITE_HEARTBEAT, self.on_heartbeat, consumer="perception-heartbeat")
        await self.bus.subscribe(subjects.SITE_TELEMETRY, self.on_telemetry, consumer="perception-telemetry")
        self._task = aio.background(self._ticker(), "perception-tick")

    async def stop(self) -> None:
        if self.enrollments is not None:
            await self.enrollments.stop()
        # The ticker also ends on this flag: on Python 3.11 a cancel that lands as one of nats-py's
        # requests is answered is dropped by `asyncio.wait_for` (see Governor.stop).
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def on_registered(self, event: Event) -> None:
        site = event.payload.site
        if site.site_id != event.params["site"]:
            raise ValueError(f"registration of {site.site_id} on {event.subject}")
        if self.enrollments is not None:
            if site.site_id not in self.enrollments.terms:
                if site.site_id not in self.pending:
                    log.warning("site %s registered but is not enrolled: it counts once an operator enrolls it",
                                site.site_id)
                self.pending[site.site_id] = site
                return
            site = self.enrollments.bound_site(site)
        await self._register(site)

    async def _register(self, site: common.Site) -> None:
        kv = await self.bus.kv(KV_SITES)
        await self.bus.retrying(lambda: kv.put(site.site_id, site.SerializeToString()), "store site")
        change = self.picture.register(site, time.time())
        log.info("site %s registered (%d GPU pools)", site.site_id, len(site.gpu_pools))
        if change:
            await self.publish_change(change)

    async def on_heartbeat(self, event: Event) -> None:
        change = self.picture.heartbeat(event.params["site"], time.time())
        if change:
            await self.publish_change(change)

    async def on_telemetry(self, event: Event) -> None:
        t = event.payload
        if t.site_id != event.params["site"]:
            raise ValueError(f"telemetry for {t.site_id} on {event.subject}")
        if self.enrollments is not None:
            if t.site_id not in self.enrollments.terms:
                return
            t = self.enrollments.bound_telemetry(t)
        if self.picture.telemetry(t):
            for load in t.services:  # each telemetry message reports one emulated tick
                if load.requests:
                    metrics.SERVICE_REQUESTS.labels(load.workload_id, "met").inc(load.requests_ok)
                    metrics.SERVICE_REQUESTS.labels(load.workload_id, "missed").inc(max(0.0, load.requests - load.requests_ok))

    async def publish_change(self, change: StateChange) -> None:
        msg = ppb.SiteStateChanged(site_id=change.site_id, state=change.state, reason=change.reason)
        msg.changed_at.GetCurrentTime()
        level = logging.INFO if change.state == common.SITE_STATE_UP else logging.WARNING
        log.log(level, "site %s is %s: %s", change.site_id, common.SiteState.Name(change.state), change.reason)
        await self.bus.publish(subjects.PERCEPTION_SITE_STATE, msg, site=change.site_id)

    async def _enrolled_since(self) -> None:
        """Sites enrolled (or whose terms changed) since the last tick: a waiting registration
        counts now, a registered site takes the new terms."""
        assert self.enrollments is not None
        for site_id in self.enrollments.take_changed():
            site = self.pending.pop(site_id, None)
            if site is None and site_id in self.picture.sites:
                site = self.picture.sites[site_id].site
            if site is not None:
                await self._register(self.enrollments.bound_site(site))

    async def tick_once(self) -> ppb.Snapshot:
        if self.enrollments is not None and self.enrollments.changed:
            await self._enrolled_since()
        now = time.time()
        holding = self.picture.holding
        for change in self.picture.check(now):
            await self.publish_change(change)
        if self.picture.holding and not holding:
            silent = sum(1 for e in self.picture.sites.values()
                         if now - e.last_heartbeat > self.picture.heartbeat_timeout_s)
            log.warning("%d of %d sites went silent at once: more like the bus (a NATS node failing over) "
                        "than the sites; not marking them down for up to %.0f s", silent, len(self.picture.sites),
                        self.picture.hold_s)
        snap = self.picture.tick(now)
        self.latest = snap
        export_snapshot(snap)
        for hook in self.on_tick:
            hook(snap)
        await self.bus.publish(subjects.PERCEPTION_SNAPSHOT, snap)
        for q in list(self.watchers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # a slow watcher gets the newest snapshots, not a backlog
            q.put_nowait(snap)
        return snap

    async def _ticker(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self.tick_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep ticking through a NATS outage
                log.exception("perception tick failed")
            await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))


def export_snapshot(snap: ppb.Snapshot) -> None:
    """The pool's picture as gauges: sites up, GPUs used/free per site and type, services' replicas,
    request rates and SLO attainment, training progress (series of what is gone disappear)."""
    up: dict[tuple[str], float] = {}
    gpus: dict[tuple[str, str, str], float] = {}
    progress: dict[tuple[str], float] = {}
    for s in snap.sites:
        sid = s.site.site_id
        up[(sid,)] = 1.0 if s.state == common.SITE_STATE_UP else 0.0
        for pool in s.gpu_pools:
            gpus[(sid, pool.gpu_type, "used")] = float(pool.used)
            gpus[(sid, pool.gpu_type, "free")] = float(max(0, pool.count - pool.used))
        for j in s.jobs:
            key = (j.workload_id,)
            progress[key] = max(progress.get(key, 0.0), 1.0 if j.finished else j.progress)
    metrics.replace_gauge(metrics.SITE_UP, up)
    metrics.replace_gauge(metrics.SITE_GPUS, gpus)
    metrics.replace_gauge(metrics.TRAINING_PROGRESS, progress)
    metrics.replace_gauge(metrics.SERVICE_REPLICAS, {(v.workload_id,): float(v.replicas) for v in snap.services})
    metrics.replace_gauge(metrics.SERVICE_RATE, {(v.workload_id,): v.request_rate_rps for v in snap.services})
    metrics.replace_gauge(metrics.SERVICE_SLO, {(v.workload_id,): v.requests_ok / v.requests if v.requests else 1.0
                                                for v in snap.services})
    metrics.SNAPSHOT_SEQUENCE.set(snap.sequence)
