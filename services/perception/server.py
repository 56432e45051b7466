"""Perception server: gRPC (PerceptionService + health + reflection), NATS, tick loop, shutdown."""

from __future__ import annotations

import asyncio
import logging

from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cncbrain import grpcserver
from cncbrain.auth import TokenFeed, server_auth
from cncbrain.bus import Bus
from cncbrain.grpcserver import GrpcServer, start_grpc_server
from services.perception.domain import PoolPicture
from services.perception.events import PerceptionEvents
from services.perception.owners import Owners
from services.perception.rpc import PerceptionServicer
from services.perception.settings import Settings
from services.perception.web import ConsoleView, WebServer

log = logging.getLogger("perception")
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PerceptionService"].full_name


class PerceptionServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.picture = PoolPicture(settings.heartbeat_timeout_s, settings.forecast_alpha, settings.forecast_beta,
                                   mass_silence_share=settings.mass_silence_share,
                                   hold_s=settings.mass_silence_hold_s)
        self.bus: Bus | None = None
        self.events: PerceptionEvents | None = None
        self.grpc: GrpcServer | None = None
        self.auth_feed: TokenFeed | None = None
        self.console: ConsoleView | None = None
        self.web: WebServer | None = None

    @property
    def port(self) -> int:
        assert self.grpc
        return self.grpc.port

    async def start(self) -> PerceptionServer:
        self.bus = await Bus.connect(self.settings.nats_url, "perception", identity="perception")
        self.events = PerceptionEvents(self.bus, self.picture, self.settings.tick_s)
        await self.events.start()
        servicer = PerceptionServicer(self.picture, self.events, Owners(self.bus))
        interceptor, self.auth_feed = await server_auth(self.bus, enabled=self.settings.auth_enabled)
        self.grpc = await start_grpc_server(
            self.settings,
            lambda server: perception_pb2_grpc.add_PerceptionServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            interceptors=[interceptor],
        )
        if self.settings.web_enabled:
            self.console = ConsoleView(self.bus, self.settings.web_history)
            await self.console.start()
            self.events.on_tick.append(self.console.on_tick)
            self.web = await WebServer(self.console, interceptor, self.settings.web_host,
                                       self.settings.web_port).start(self.settings.web_port_file)
        log.info("perception serving gRPC on %s:%d, NATS %s", self.settings.grpc_host, self.port, self.settings.nats_url)
        return self

    async def stop(self) -> None:
        if self.web:
            await self.web.stop()
        if self.console:
            await self.console.stop()
        if self.grpc:
            await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.events:
            await self.events.stop()
        if self.auth_feed is not None:
            await self.auth_feed.stop()
        if self.bus:
            await self.bus.close()
        log.info("perception stopped")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    return await grpcserver.serve("perception", settings, PerceptionServer(settings).start, stop)
