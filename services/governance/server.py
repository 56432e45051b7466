"""Governance server: gRPC (GovernanceService + health + reflection, behind the auth interceptor,
optionally TLS), the ledger writer and its NATS consumers, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cncbrain import grpcserver
from cncbrain.auth import AuthInterceptor
from cncbrain.bus import Bus
from cncbrain.certs import server_credentials
from cncbrain.grpcserver import GrpcServer, start_grpc_server
from cncbrain.identity import TokenDirectory
from services.governance.events import Governor
from services.governance.rpc import OPERATOR_ONLY, GovernanceServicer
from services.governance.settings import Settings

log = logging.getLogger("governance")
SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["GovernanceService"].full_name


class GovernanceServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus: Bus | None = None
        self.governor: Governor | None = None
        self.grpc: GrpcServer | None = None
        self.directory = TokenDirectory()
        self.auth = AuthInterceptor(self.directory, OPERATOR_ONLY, enabled=settings.auth_enabled)

    @property
    def port(self) -> int:
        assert self.grpc
        return self.grpc.port

    async def start(self) -> GovernanceServer:
        self.bus = await Bus.connect(self.settings.nats_url, "governance", identity="governance")
        self.governor = Governor(self.bus, self.settings, self.directory)
        await self.governor.start()
        servicer = GovernanceServicer(self.governor)
        self.grpc = await start_grpc_server(
            self.settings,
            lambda server: governance_pb2_grpc.add_GovernanceServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            interceptors=[self.auth],
            credentials=server_credentials(self.settings.tls_cert_file, self.settings.tls_key_file,
                                           self.settings.tls_client_ca_file),
        )
        log.info("governance serving gRPC on %s:%d (auth %s, TLS %s), ledger of %d entries",
                 self.settings.grpc_host, self.port, "on" if self.settings.auth_enabled else "OFF",
                 "on" if self.settings.tls_cert_file else "off", self.governor.head.length)
        return self

    async def stop(self) -> None:
        if self.grpc:
            await self.grpc.stop(self.settings.shutdown_grace_s)
        if self.governor:
            await self.governor.stop()
        if self.bus:
            await self.bus.close()
        log.info("governance stopped")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    return await grpcserver.serve("governance", settings, GovernanceServer(settings).start, stop)
