"""PerceptionService: translates requests into questions to the pool picture (proto ⇄ domain).

A tenant sees the whole pool's capacity (sites, GPUs, state, utilisation) but only its own
workloads' details (per-site service loads and job progress, pool-wide service summaries,
forecasts); an operator sees everything (`services.perception.owners`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cncbrain.auth import optional_principal
from cncbrain.errors import InvalidArgument, NotFound
from services.perception.domain import PoolPicture
from services.perception.events import PerceptionEvents
from services.perception.owners import Owners, scoped_snapshot, scoped_status, workload_ids


class PerceptionServicer(perception_pb2_grpc.PerceptionServiceServicer):
    def __init__(self, picture: PoolPicture, events: PerceptionEvents, owners: Owners | None = None) -> None:
        self.picture = picture
        self.events = events
        self.owners = owners
        """Who owns each workload (None: no tenants to tell apart, everything shown)."""

    async def _mine(self, workload_ids: Iterable[str]) -> Callable[[str], bool] | None:
        """None when the caller sees every workload (an operator, or no tenants); else whether a
        workload id is the calling tenant's."""
        caller = optional_principal()
        owners = self.owners
        if owners is None or caller is None or caller.is_operator:
            return None
        await owners.resolve(workload_ids)
        tenant = caller.tenant_id
        return lambda wid: bool(tenant) and owners.of(wid) == tenant

    async def _statuses(self, statuses: list[ppb.SiteStatus]) -> list[ppb.SiteStatus]:
        mine = await self._mine(workload_ids(statuses))
        return statuses if mine is None else [scoped_status(s, mine) for s in statuses]

    async def _snapshot(self, snap: ppb.Snapshot) -> ppb.Snapshot:
        mine = await self._mine(workload_ids(snap.sites, snap.services))
        return snap if mine is None else scoped_snapshot(snap, mine)

    async def ListSites(self, request: ppb.ListSitesRequest, context: grpc.aio.ServicerContext) -> ppb.ListSitesResponse:
        if request.state not in common.SiteState.values():
            raise InvalidArgument(f"state: unknown value {request.state}")
        entries = [self.picture.sites[k] for k in sorted(self.picture.sites)]
        wanted = [e for e in entries if request.state in (common.SITE_STATE_UNSPECIFIED, e.state)]
        return ppb.ListSitesResponse(sites=await self._statuses([self.picture.site_status(e) for e in wanted]))

    async def GetSite(self, request: ppb.GetSiteRequest, context: grpc.aio.ServicerContext) -> ppb.GetSiteResponse:
        if not request.site_id:
            raise InvalidArgument("site_id: required")
        entry = self.picture.sites.get(request.site_id)
        if entry is None:
            raise NotFound(f"site {request.site_id!r} is not registered")
        return ppb.GetSiteResponse(site=(await self._statuses([self.picture.site_status(entry)]))[0])

    async def GetSnapshot(self, request: ppb.GetSnapshotRequest, context: grpc.aio.ServicerContext) -> ppb.GetSnapshotResponse:
        return ppb.GetSnapshotResponse(snapshot=await self._snapshot(self.events.latest))

    async def WatchSnapshots(
        self, request: ppb.WatchSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.WatchSnapshotsResponse]:
        queue: asyncio.Queue[ppb.Snapshot] = asyncio.Queue(maxsize=8)
        self.events.watchers.add(queue)
        try:
            if self.events.latest.sequence:
                yield ppb.WatchSnapshotsResponse(snapshot=await self._snapshot(self.events.latest))
            while True:
                yield ppb.WatchSnapshotsResponse(snapshot=await self._snapshot(await queue.get()))
        finally:
            self.events.watchers.discard(queue)

    async def GetForecast(self, request: ppb.GetForecastRequest, context: grpc.aio.ServicerContext) -> ppb.GetForecastResponse:
        if not request.workload_id:
            raise InvalidArgument("workload_id: required")
        horizon = request.horizon_ticks or 5
        if not 1 <= horizon <= 60:
            raise InvalidArgument("horizon_ticks: must be 1..60")
        forecast = self.picture.forecast(request.workload_id, horizon)
        mine = await self._mine([request.workload_id])
        if forecast is None or (mine is not None and not mine(request.workload_id)):  # another tenant's: as unknown
            raise NotFound(f"no telemetry yet for inference service {request.workload_id!r}")
        return ppb.GetForecastResponse(forecast=forecast)
