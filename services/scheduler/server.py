"""Scheduler server: gRPC (SchedulerService + health + reflection), NATS coordinator, shutdown."""

from __future__ import annotations

import asyncio
import logging

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain import grpcserver
from cncbrain.auth import TokenFeed, server_auth
from cncbrain.bus import Bus
from cncbrain.grpcserver import GrpcServer, start_grpc_server
from services.scheduler.coordinator import Coordinator
from services.scheduler.governance import open_gate
from services.scheduler.rpc import SchedulerServicer
from services.scheduler.settings import Settings

log = logging.getLogger("scheduler")
SERVICE_NAME = spb.DESCRIPTOR.services_by_name["SchedulerService"].full_name


class SchedulerServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus: Bus | None = None
        self.coordinator: Coordinator | None = None
        self.grpc: GrpcServer | None = None
        self.auth_feed: TokenFeed | None = None

    @property
    def port(self) -> int:
        assert self.grpc
        return self.grpc.port

    async def start(self) -> SchedulerServer:
        self.bus = await Bus.connect(self.settings.nats_url, "scheduler", identity="scheduler")
        # The governance gate (admission, the placement check before every commit), then auth.
        gate, token = await open_gate(self.bus, self.settings.governance_target, self.settings.governance_token)
        self.coordinator = Coordinator(self.bus, self.settings, gate, token)
        await self.coordinator.start()
        interceptor, self.auth_feed = await server_auth(self.bus, enabled=self.settings.auth_enabled)
        servicer = SchedulerServicer(self.coordinator)
        self.grpc = await start_grpc_server(
            self.settings,
            lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            interceptors=[interceptor],
        )
        log.info("scheduler serving gRPC on %s:%d, NATS %s", self.settings.grpc_host, self.port, self.settings.nats_url)
        return self

    async def stop(self) -> None:
        if self.grpc:
            await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.coordinator:
            await self.coordinator.stop()  # closes the gate
        if self.auth_feed is not None:
            await self.auth_feed.stop()
        if self.bus:
            await self.bus.close()
        log.info("scheduler stopped")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    return await grpcserver.serve("scheduler", settings, SchedulerServer(settings).start, stop)
