"""PerceptionService: translates requests into questions to the pool picture (proto ⇄ domain)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cnc.common.v1 import common_pb2
from cnc.perception.v1 import perception_pb2 as pb
from cnc.perception.v1 import perception_pb2_grpc
from services.perception.domain import PoolPicture
from services.perception.events import PerceptionEvents


class PerceptionServicer(perception_pb2_grpc.PerceptionServiceServicer):
    def __init__(self, picture: PoolPicture, events: PerceptionEvents) -> None:
        self.picture = picture
        self.events = events

    async def ListSites(self, request: pb.ListSitesRequest, context: grpc.aio.ServicerContext) -> pb.ListSitesResponse:
        if request.state not in common_pb2.SiteState.values():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"state: unknown value {request.state}")
        entries = [self.picture.sites[k] for k in sorted(self.picture.sites)]
        wanted = [e for e in entries if request.state in (common_pb2.SITE_STATE_UNSPECIFIED, e.state)]
        return pb.ListSitesResponse(sites=[self.picture.site_status(e) for e in wanted])

    async def GetSite(self, request: pb.GetSiteRequest, context: grpc.aio.ServicerContext) -> pb.GetSiteResponse:
        if not request.site_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "site_id: required")
        entry = self.picture.sites.get(request.site_id)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"site {request.site_id!r} is not registered")
        return pb.GetSiteResponse(site=self.picture.site_status(entry))

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.aio.ServicerContext) -> pb.GetSnapshotResponse:
        return pb.GetSnapshotResponse(snapshot=self.events.latest)

    async def WatchSnapshots(
        self, request: pb.WatchSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSnapshotsResponse]:
        queue: asyncio.Queue[pb.Snapshot] = asyncio.Queue(maxsize=8)
        self.events.watchers.add(queue)
        try:
            if self.events.latest.sequence:
                yield pb.WatchSnapshotsResponse(snapshot=self.events.latest)
            while True:
                yield pb.WatchSnapshotsResponse(snapshot=await queue.get())
        finally:
            self.events.watchers.discard(queue)

    async def GetForecast(self, request: pb.GetForecastRequest, context: grpc.aio.ServicerContext) -> pb.GetForecastResponse:
        if not request.workload_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "workload_id: required")
        horizon = request.horizon_ticks or 5
        if not 1 <= horizon <= 60:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "horizon_ticks: must be 1..60")
        forecast = self.picture.forecast(request.workload_id, horizon)
        if forecast is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no telemetry yet for inference service {request.workload_id!r}"
            )
        return pb.GetForecastResponse(forecast=forecast)
