"""What every gRPC service of the brain shares: an aio server with health and reflection, the
tracing interceptor, the request limits, one mapping of errors to statuses, raised pending-request limit, a clear error for a busy port, and a run loop
that stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cncbrain import aio, limits, telemetry
from cncbrain.certs import RECONNECT_OPTIONS
from cncbrain.errors import CncError, UsageError
from cncbrain.settings import ServiceSettings
from cncbrain.supervise import EXIT_PORT_IN_USE

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


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
"""A handler's function: (request or request iterator, context) -> a response, or an async
iterator of responses for a response-streaming method."""


def rewrap(handler: Any, unary: Callable[[Behavior], Behavior], streaming: Callable[[Behavior], Behavior]) -> Any:
    """`handler` (a `grpc.RpcMethodHandler` of any of the four kinds) with its function wrapped:
    by `unary` when the method answers once, by `streaming` when it answers with a stream."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), handler.request_deserializer,
                                                 handler.response_serializer)


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Every request of every service is checked against the limits that hold for any field
    (`cncbrain.limits.check_message`: finite floats, bounded strings and lists) before its handler
    runs; a failing one is answered INVALID_ARGUMENT naming the field. Field-specific bounds are the
    handlers' (e.g. `services/scheduler/domain.py`)."""

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler

        def unary(inner: Behavior) -> Behavior:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if (problem := limits.check_message(request)) is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                return await inner(request, context)

            return checked

        def streaming(inner: Behavior) -> Behavior:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if (problem := limits.check_message(request)) is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                async for item in inner(request, context):
                    yield item

            return checked

        return rewrap(handler, unary, streaming)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place an exception of a handler becomes a gRPC status, for every service: a
    `CncError` is answered with its class's `status` and its message (`cncbrain.errors`); any other
    exception is a bug, answered INTERNAL — never a status that tells the caller to retry or that
    nothing changed — with its traceback in the service's log. A handler's own `context.abort`
    passes through."""

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def unary(inner: Behavior) -> Behavior:
            async def answered(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort_with(context, exc, method)

            return answered

        def streaming(inner: Behavior) -> Behavior:
            async def answered(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort_with(context, exc, method)

            return answered

        return rewrap(handler, unary, streaming)


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> NoReturn:
    """End the call with the status `exc` stands for (see `ErrorInterceptor`)."""
    if isinstance(exc, CncError):
        await context.abort(exc.status, str(exc))
    log.error("%s failed: unexpected %s: %s", method, type(exc).__name__, exc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {method} ({type(exc).__name__}); the service logged its traceback")


async def start_grpc_server(
    settings: ServiceSettings,
    register: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Build, bind and start the server; `register` adds the block's servicer.

    interceptors: run after tracing, e.g. `cncbrain.auth.AuthInterceptor` (see cncbrain/auth.py);
    the request limits (`LimitsInterceptor`) are checked after them, and the handler's exceptions
    become statuses (`ErrorInterceptor`) innermost.
    credentials: TLS server credentials (`cncbrain.certs.server_credentials`); None: plaintext.
    """
    names = list(service_names)

    def build() -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        server = grpc.aio.server(
            interceptors=[telemetry.TracingServerInterceptor(), *interceptors, LimitsInterceptor(), ErrorInterceptor()],
            options=[
                ("grpc.max_pending_requests", settings.max_pending_requests),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=None,
        )
        register(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        return server, health_servicer

    # A standby taking over binds the port its predecessor used, which a predecessor still shutting
    # down may hold a moment longer: a busy port is tried again for `bind_wait_s`.
    deadline = time.monotonic() + settings.bind_wait_s
    while True:
        address = f"{settings.grpc_host}:{settings.grpc_port or reported_port(settings.port_file)}"
        server, health_servicer = build()
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
            problem = "" if port else "port in use or address unavailable"
        except RuntimeError as exc:
            port, problem = 0, f"port in use or address unavailable ({exc})"
        if port:
            break
        if time.monotonic() >= deadline:
            raise PortInUse(f"cannot listen on {address}: {problem}")
        await asyncio.sleep(0.2)
    await server.start()
    if settings.port_file is not None:
        settings.port_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(settings.port_file)
    started = GrpcServer(server, port, health_servicer, names)
    await started.set_serving(True)
    return started


class PortInUse(CncError):
    """The gRPC port could not be bound; the process exits with `supervise.EXIT_PORT_IN_USE`."""


def reported_port(path: Path | None) -> int:
    """The port written to `path` by a service that listened before (0: none)."""
    try:
        return int(path.read_text().strip()) if path is not None else 0
    except (OSError, ValueError):
        return 0


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_stop(stop: asyncio.Event) -> int:
    """Wait for `stop` (a signal) or for a background task of this process to die
    (`aio.fatal_event`): the exit status the process should end with, 0 or 1."""
    fatal = aio.fatal_event()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(fatal.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if fatal.is_set():
        log.critical("stopping: a background task died (see above)")
        return 1
    return 0


class Stoppable(Protocol):
    async def stop(self) -> None: ...


async def serve(name: str, settings: ServiceSettings, start: Callable[[], Awaitable[Stoppable]],
                stop: asyncio.Event | None = None) -> int:
    """Run a service process: telemetry; with `settings.lease`, wait as a standby until this
    instance holds the role's lease (`cncbrain.lease`); `start()`; then wait for SIGTERM/SIGINT (or
    `stop`), a dead background task or a lost lease, and stop the service (releasing the lease, so
    a standby takes over at once). Returns the exit status."""
    telemetry.setup_process(name, settings)
    stop = stop or stop_event_on_signals()
    lease = lease_bus = None
    if settings.lease:
        from cncbrain.bus import Bus
        from cncbrain.lease import Lease, bucket_of

        # a connection of its own: renewals never queue behind the service's traffic
        lease_bus = await Bus.connect(settings.nats_url, f"{name}-lease", identity=name, ensure=False)
        lease = Lease(await lease_bus.kv(bucket_of(name)), name, settings.instance or socket.gethostname(),
                      settings.lease_ttl_s)
        if not await lease.acquire(stop):
            await lease_bus.close()
            return 0
    try:
        server = await _start(name, start, stop)
        if server is None:
            return 0
        try:
            return await wait_for_stop(stop)
        finally:
            await server.stop()
    finally:
        if lease is not None:
            await lease.release()
        if lease_bus is not None:
            await lease_bus.close()


async def _start(name: str, start: Callable[[], Awaitable[Stoppable]], stop: asyncio.Event,
                 window_s: float = 120.0) -> Stoppable | None:
    """`start()`, again after a pause while it fails only because NATS is slow or away (a loaded
    machine's JetStream missing a start-up request, a node failing over), instead of crashing the
    process into its supervisor's crash count; None when `stop` came meanwhile."""
    from cncbrain.bus.connection import RETRYABLE

    deadline = time.monotonic() + window_s
    pause = 0.5
    while True:
        try:
            return await start()
        except RETRYABLE as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: start-up failed on NATS (%r); starting again in %.1f s", name, exc, pause)
            owner = getattr(start, "__self__", None)  # the half-started server: let go of what it got
            if owner is not None:
                with contextlib.suppress(Exception):
                    await owner.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        if stop.is_set():
            return None
        pause = min(pause * 2, 5.0)


async def wait_healthy(target: str, timeout_s: float = 10.0, service: str = "") -> None:
    """Wait until the health service at `target` answers SERVING (used by `up` and tests)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(target, options=list(RECONNECT_OPTIONS)) as channel:
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


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Entry-point helper: run `main`; a bad setting exits 2, another error 1, each with its message."""
    try:
        return aio.run(main())
    except CncError as exc:
        log.error("%s", exc)
        print(f"error: {exc}")
        if isinstance(exc, PortInUse):
            return EXIT_PORT_IN_USE
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130
