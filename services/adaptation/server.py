"""Adaptation server: gRPC (AdaptationService + health + reflection, auth, optional TLS), the
adapter's NATS consumers, the governance gate for placement policy, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.adaptation.v1 import adaptation_pb2_grpc
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cncbrain import grpcserver
from cncbrain.auth import TokenFeed, load_token, server_auth, token_interceptors
from cncbrain.bus import Bus
from cncbrain.certs import client_channel, server_credentials
from cncbrain.governance.gate import GovernanceGate
from cncbrain.grpcserver import GrpcServer, start_grpc_server
from services.adaptation.events import Adapter
from services.adaptation.rpc import OPERATOR_ONLY, AdaptationServicer
from services.adaptation.settings import Settings

log = logging.getLogger("adaptation")
SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdaptationService"].full_name


class AdaptationServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus: Bus | None = None
        self.adapter: Adapter | None = None
        self.gate: GovernanceGate | None = None
        self.grpc: GrpcServer | None = None
        self.feed: TokenFeed | None = None
        self._perception: grpc.aio.Channel | None = None

    @property
    def port(self) -> int:
        assert self.grpc
        return self.grpc.port

    def _forecaster(self):
        if not self.settings.perception_target:
            return None
        token = self.settings.token or load_token(required=False)
        self._perception = client_channel(self.settings.perception_target, interceptors=token_interceptors(token))
        stub = perception_pb2_grpc.PerceptionServiceStub(self._perception)
        horizon = self.settings.forecast_horizon_ticks

        async def forecast(workload_id: str) -> float | None:
            try:
                resp = await stub.GetForecast(ppb.GetForecastRequest(
                    workload_id=workload_id, horizon_ticks=horizon), timeout=0.5)
            except grpc.aio.AioRpcError:
                return None
            return max(resp.forecast.predicted_rps, default=None)

        return forecast

    async def start(self) -> AdaptationServer:
        self.bus = await Bus.connect(self.settings.nats_url, "adaptation", identity="adaptation")
        self.gate = await GovernanceGate.start(self.bus, None)
        self.adapter = Adapter(self.bus, self.settings, self.gate, self._forecaster())
        await self.adapter.start()
        interceptor, self.feed = await server_auth(self.bus, OPERATOR_ONLY, enabled=self.settings.auth_enabled)
        servicer = AdaptationServicer(self.adapter)
        self.grpc = await start_grpc_server(
            self.settings,
            lambda server: adaptation_pb2_grpc.add_AdaptationServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            interceptors=[interceptor],
            credentials=server_credentials(self.settings.tls_cert_file, self.settings.tls_key_file,
                                           self.settings.tls_client_ca_file),
        )
        log.info("adaptation serving gRPC on %s:%d (auth %s), NATS %s", self.settings.grpc_host, self.port,
                 "on" if self.settings.auth_enabled else "OFF", self.settings.nats_url)
        return self

    async def stop(self) -> None:
        if self.grpc:
            await self.grpc.stop(self.settings.shutdown_grace_s)
        for closer in (self.adapter and self.adapter.stop, self.feed and self.feed.stop, self.gate and self.gate.close):
            if closer:
                with contextlib.suppress(Exception):
                    await closer()
        if self._perception is not None:
            await self._perception.close()
        if self.bus:
            await self.bus.close()
        log.info("adaptation stopped")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    return await grpcserver.serve("adaptation", settings, AdaptationServer(settings).start, stop)
