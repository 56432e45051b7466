"""What every gRPC service of the brain shares: an aio server with health and reflection, the
tracing interceptor, raised pending-request limit, a clear error for a busy port, and a run loop
that stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cncbrain import aio, telemetry
from cncbrain.errors import CncError
from cncbrain.settings import ServiceSettings

log = logging.getLogger(__name__)


class GrpcServer:
    """A started aio server: `port` is the bound port, `health` flips SERVING / NOT_SERVING."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer, names: list[str]):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.names = names

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_grpc_server(
    settings: ServiceSettings,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Build, bind and start the server; `register` adds the block's servicer.

    interceptors: run after tracing, e.g. `cncbrain.auth.AuthInterceptor` (see cncbrain/auth.py).
    credentials: TLS server credentials (`cncbrain.certs.server_credentials`); None: plaintext.
    """
    server = grpc.aio.server(
        interceptors=[telemetry.TracingServerInterceptor(), *interceptors],
        options=[
            ("grpc.max_pending_requests", settings.max_pending_requests),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=None,
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise CncError(f"cannot listen on {address}: port in use or address unavailable ({exc})") from None
    if port == 0:
        raise CncError(f"cannot listen on {address}: port in use or address unavailable")
    await server.start()
    started = GrpcServer(server, port, health_servicer, names)
    await started.set_serving(True)
    return started


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_healthy(target: str, timeout_s: float = 10.0, service: str = "") -> None:
    """Wait until the health service at `target` answers SERVING (used by `up` and tests)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise CncError(f"{target} not healthy within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


def run(main: Callable[[], Awaitable[int]]) -> int:
    """Entry-point helper: run `main` and turn a user error into a message and exit code 2."""
    try:
        return aio.run(main())
    except CncError as exc:
        log.error("%s", exc)
        print(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
