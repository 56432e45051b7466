"""OpenTelemetry set up once for every process: tracer provider, exporters, W3C propagation
through gRPC metadata and NATS headers, and logging.

`setup(service_name, exporter)` is called by each entry point. Spans are recorded only while the
process's tracer provider has a span processor (an exporter: `CNC_<SERVICE>_OTEL_EXPORTER=console|otlp`,
or one added later, as the trace test does). With exporter `none`, `span()` builds no SDK span
(attributes, events, timestamps, processor calls): it makes current a bare span context — the
parent's trace id (a new one for a root) and a fresh span id, flagged sampled — so every event
and call still carries a `traceparent` and traces flow on through gRPC metadata and NATS headers
to processes that do record (a collector switched on for one service sees its spans in the
callers' traces), at a few microseconds per span. gRPC instrumentation is done by the two
interceptors below rather than the contrib package, so it works with every grpcio release the
project pins.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping, Sequence
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


class _Provider(TracerProvider):
    """A tracer provider that knows whether anything consumes its spans."""

    recording = False

    def add_span_processor(self, span_processor: Any) -> None:
        super().add_span_processor(span_processor)
        self.recording = True


def recording() -> bool:
    """True when this process's spans go somewhere (a span processor is installed)."""
    return bool(getattr(trace.get_tracer_provider(), "recording", True))


_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_bits = random.getrandbits


def _bare_span(context: otel_context.Context | None) -> otel_context.Context:
    """`context` (None: the current one) with a bare child span context as its current span."""
    parent = trace.get_current_span(context).get_span_context()
    if parent.is_valid:
        sc = trace.SpanContext(parent.trace_id, _bits(64) or 1, False, _SAMPLED, parent.trace_state)
    else:
        sc = trace.SpanContext(_bits(128) or 1, _bits(64) or 1, False, _SAMPLED)
    return trace.set_span_in_context(trace.NonRecordingSpan(sc), context)


@contextlib.contextmanager
def span(tracer_name: str, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
         context: otel_context.Context | None = None, links: Sequence[trace.Link] | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[None]:
    """The current span for the block, child of `context` (None: of the current span). A recorded
    span when spans go somewhere; else a bare span context that only carries the trace on."""
    if recording():
        with tracer(tracer_name).start_as_current_span(name, context=context, kind=kind, links=links,
                                                       attributes=attributes):
            yield
        return
    token = otel_context.attach(_bare_span(context))
    try:
        yield
    finally:
        otel_context.detach(token)


def setup(service_name: str, exporter: str = "none", otlp_endpoint: str = "", log_level: str = "INFO") -> None:
    """Install the tracer provider (once per process) and configure logging."""
    global _configured
    logging.basicConfig(
        level=getattr(logging, log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if _configured:
        return
    provider = _Provider(resource=Resource.create({"service.name": service_name}))
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


_EMPTY = otel_context.Context()


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context in `carrier` (an empty one, i.e. a new root, when it carries none).

    A plain version-00 `traceparent` without `tracestate` (what every process of the brain sends)
    is parsed here directly, several times cheaper than the propagator; anything else goes to it."""
    value = carrier.get("traceparent")
    if value is None:
        return _EMPTY
    if len(value) == 55 and value[:3] == "00-" and "tracestate" not in carrier:
        try:
            trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:55], 16)
        except ValueError:
            return _EMPTY
        if trace_id and span_id and value[35] == "-" and value[52] == "-":
            sc = trace.SpanContext(trace_id, span_id, True, trace.TraceFlags(flags & 0xFF))
            return trace.set_span_in_context(trace.NonRecordingSpan(sc), _EMPTY)
        return _EMPTY
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
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with span("cncbrain.grpc", method, context=parent, kind=SpanKind.SERVER):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with span("cncbrain.grpc", method, context=parent, kind=SpanKind.SERVER):
                    async for item in inner_us(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class _ClientTracing:
    async def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        with span("cncbrain.grpc", method, kind=SpanKind.CLIENT):
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
