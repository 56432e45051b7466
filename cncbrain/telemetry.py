"""OpenTelemetry set up once for every process: tracer provider, exporters, W3C propagation
through gRPC metadata and NATS headers, and logging.

`setup(service_name, exporter)` is called by each entry point; exporter `none` still creates real
spans so `traceparent` flows across processes (a collector can be switched on later by setting
`CNC_<SERVICE>_OTEL_EXPORTER=otlp`). gRPC instrumentation is done by the two interceptors below
rather than the contrib package, so it works with every grpcio release the project pins.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_configured = False


def setup(service_name: str, exporter: str = "none", otlp_endpoint: str = "", log_level: str = "INFO") -> None:
    """Install the tracer provider (once per process) and configure logging."""
    global _configured
    logging.basicConfig(
        level=getattr(logging, log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    span_exporter: SpanExporter | None = None
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _tracers.clear()
    _configured = True


_tracers: dict[str, trace.Tracer] = {}


def tracer(name: str = "cncbrain") -> trace.Tracer:
    """A cached tracer (get_tracer builds a new one per call, which costs on every event)."""
    found = _tracers.get(name)
    if found is None:
        found = _tracers[name] = trace.get_tracer(name)
    return found


def inject(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current span's `traceparent` (and `tracestate`) into a header dict."""
    _propagator.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    return _propagator.extract(carrier)


def current_traceparent() -> str:
    return inject({}).get("traceparent", "")


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Starts a SERVER span per RPC, child of the caller's `traceparent` metadata."""

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.lstrip("/")
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        parent = extract(metadata)
        tr = tracer("cncbrain.grpc")
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with tr.start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with tr.start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                    async for item in inner_us(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class _ClientTracing:
    async def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        with tracer("cncbrain.grpc").start_as_current_span(details.method.decode() if isinstance(details.method, bytes) else details.method, kind=SpanKind.CLIENT):
            metadata = list(details.metadata or [])
            metadata.extend(inject({}).items())
            new_details = grpc.aio.ClientCallDetails(
                details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
            )
            return await continuation(new_details, request)


class TracingUnaryUnaryClientInterceptor(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class TracingUnaryStreamClientInterceptor(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    return [TracingUnaryUnaryClientInterceptor(), TracingUnaryStreamClientInterceptor()]
