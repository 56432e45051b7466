"""The brain's live web page, served by perception (the process that holds the live picture).

Read-only, behind the operator token: `GET /` is the page itself (static, no data), `GET /api/state`
the picture it draws, as JSON, and needs ``Authorization: Bearer <operator token>`` (the page keeps
the token it is given — pasted, or in the URL's `#token=` fragment, which browsers never send — in
the tab's session storage). With auth off (`--no-auth`) the API is open like every other service.

What the page shows, and where perception gets it:
- sites on a map from their coordinates, GPUs used/free per site and type: perception's own picture
  (registrations and the last telemetry);
- workloads with their placements and reasons: the scheduler's records, followed read-only from the
  `cnc-workloads` KV bucket;
- SLO attainment and placements over time: a sample per perception tick, the last `history` kept;
- recent adaptation actions: adaptation's `cnc.adaptation.action` stream (the last hour on start,
  then each new one).

The page is one HTML file with plain JavaScript and inline SVG (services/perception/static/): no
build step, no CDN, nothing fetched from outside.
"""

from __future__ import annotations

import collections
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain import metrics
from cncbrain.auth import AuthInterceptor
from cncbrain.bus import KV_WORKLOADS, Bus, Event, subjects
from cncbrain.identity import AuthError, PermissionDenied, require_operator
from cncbrain.kvfeed import KvFollower
from cncbrain.workload import spec_of

log = logging.getLogger(__name__)
ACTIONS_KEPT = 50
ACTIONS_REPLAYED_S = 3600.0


def _name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower() if value in enum.values() else str(value)


class ConsoleView:
    """What the page draws, kept current from perception's ticks, the workload records and the
    adaptation actions."""

    def __init__(self, bus: Bus, history: int = 600) -> None:
        self.bus = bus
        self.workloads: dict[str, spb.Workload] = {}
        self.actions: collections.deque[apb.AdaptationAction] = collections.deque(maxlen=ACTIONS_KEPT)
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self.snapshot = ppb.Snapshot()
        self._follower: KvFollower | None = None

    async def start(self) -> None:
        self._follower = KvFollower(await self.bus.kv(KV_WORKLOADS), self._apply_workload, "console-workloads")
        await self._follower.start()
        since = time.time() - ACTIONS_REPLAYED_S
        for event in await self.bus.retrying(lambda: self.bus.events_since(subjects.ADAPTATION_ACTION, since), "read recent actions"):
            self.actions.append(event.payload)
        await self.bus.subscribe(subjects.ADAPTATION_ACTION, self._on_action, consumer="perception-console-actions")

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    def _apply_workload(self, entry: Any) -> None:
        if not entry.value:
            self.workloads.pop(entry.key, None)
            return
        try:
            self.workloads[entry.key] = spb.Workload.FromString(entry.value)
        except DecodeError:
            log.warning("workload record %s is not a Workload; not shown", entry.key)

    async def _on_action(self, event: Event) -> None:
        if all(a.action_id != event.payload.action_id for a in self.actions):
            self.actions.append(event.payload)

    def on_tick(self, snap: ppb.Snapshot) -> None:
        """One sample per tick: SLO attainment (pool-wide and per service), GPUs used, placements."""
        self.snapshot = snap
        requests = sum(s.requests for s in snap.services)
        ok = sum(s.requests_ok for s in snap.services)
        used = sum(p.used for s in snap.sites for p in s.gpu_pools)
        placed = [w for w in self.workloads.values() if w.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)]
        self.samples.append({
            "t": snap.taken_at.ToNanoseconds() / 1e9,
            "sim_time_s": snap.sim_time_s,
            "slo_attainment": ok / requests if requests else None,
            "services": {s.workload_id: (s.requests_ok / s.requests if s.requests else None) for s in snap.services},
            "gpus_used": used,
            "workloads_placed": len(placed),
            "units_placed": sum(p.replicas or len(p.shard_indices) for w in placed for p in w.placements),
        })

    def state(self) -> dict[str, Any]:
        snap = self.snapshot
        sites = []
        for s in snap.sites:
            sites.append({
                "site_id": s.site.site_id, "name": s.site.name or s.site.site_id, "region": s.site.region,
                "latitude": s.site.latitude, "longitude": s.site.longitude,
                "state": _name(common.SiteState, s.state, "SITE_STATE_"),
                "gpu_utilization": s.gpu_utilization,
                "gpus": [{"gpu_type": p.gpu_type, "count": p.count, "used": p.used, "free": max(0, p.count - p.used)}
                         for p in s.gpu_pools],
            })
        slo = {s.workload_id: s for s in snap.services}
        workloads = []
        for w in sorted(self.workloads.values(), key=lambda w: w.created_at.ToNanoseconds(), reverse=True):
            spec = spec_of(w)
            summary = slo.get(w.workload_id)
            workloads.append({
                "workload_id": w.workload_id, "name": getattr(spec, "name", ""), "model": getattr(spec, "model", ""),
                "tenant": getattr(spec, "tenant", ""),
                "kind": _name(common.WorkloadKind, w.kind, "WORKLOAD_KIND_"),
                "state": _name(spb.WorkloadState, w.state, "WORKLOAD_STATE_"),
                "message": w.message, "progress": w.progress, "generation": w.generation,
                "created_at": w.created_at.ToNanoseconds() / 1e9,
                "placements": [{"site_id": p.site_id, "gpu_type": p.gpu_type,
                                "units": p.replicas or len(p.shard_indices), "gpus_per_unit": p.gpus_per_unit}
                               for p in w.placements if p.replicas or p.shard_indices],
                "replicas": summary.replicas if summary else None,
                "slo_attainment": (summary.requests_ok / summary.requests) if summary and summary.requests else None,
            })
        actions = [{
            "action_id": a.action_id, "kind": _name(apb.ActionKind, a.kind, "ACTION_KIND_"),
            "workload_id": a.workload_id, "site_id": a.site_id, "reason": a.reason,
            "at": a.at.ToNanoseconds() / 1e9, "from_replicas": a.from_replicas, "to_replicas": a.to_replicas,
            "shortfall": a.shortfall} for a in reversed(self.actions)]
        return {"sequence": snap.sequence, "taken_at": snap.taken_at.ToNanoseconds() / 1e9,
                "sim_time_s": snap.sim_time_s, "sites_up": snap.sites_up, "sites": sites,
                "workloads": workloads, "actions": actions, "history": list(self.samples)}


STATIC = "static"


def _page() -> bytes:
    return resources.files("services.perception").joinpath(STATIC, "index.html").read_bytes()


def make_app(view: ConsoleView, auth: AuthInterceptor) -> web.Application:
    page = _page()

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"})

    async def state(request: web.Request) -> web.Response:
        if auth.enabled:
            try:
                require_operator(auth.authenticate("web:/api/state", request.headers.get("Authorization")))
            except AuthError as exc:
                denied = isinstance(exc, PermissionDenied)
                metrics.AUTH_DENIALS.labels("web", "permission_denied" if denied else "unauthenticated").inc()
                return web.json_response({"error": str(exc)}, status=403 if denied else 401,
                                         headers={"WWW-Authenticate": 'Bearer realm="cncbrain"'})
        return web.json_response(view.state(), headers={"Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.get("/", index), web.get("/api/state", state), web.get("/healthz", healthz)])
    return app


class WebServer:
    """The page's HTTP server on `host:port` (0: a free port); `url` once started."""

    def __init__(self, view: ConsoleView, auth: AuthInterceptor, host: str, port: int) -> None:
        self.runner = web.AppRunner(make_app(view, auth), access_log=None)
        self.host, self.port = host, port
        self.url = ""

    async def start(self, report: str = "") -> WebServer:
        await self.runner.setup()
        port = self.port or metrics.reported_port(report)  # a restart keeps the page where it was
        try:
            await web.TCPSite(self.runner, self.host, port).start()
        except OSError as exc:
            if self.port or not port:
                from cncbrain.errors import CncError

                raise CncError(f"web page: cannot listen on {self.host}:{port} ({exc})") from None
            log.warning("the web page's port of the previous run, %d, is taken (%s); using a free one", port, exc)
            await web.TCPSite(self.runner, self.host, 0).start()
        port = self.runner.addresses[-1][1]  # the bound port (a free one for 0)
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.url = f"http://{host}:{port}/"
        if report:
            metrics.write_report(Path(report), self.url)
        log.info("web page on %s", self.url)
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()
