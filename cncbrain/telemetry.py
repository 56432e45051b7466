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
import json
import logging
import os
import random
import time
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

from cncbrain.errors import UsageError

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


def setup(service_name: str, exporter: str | None = None, otlp_endpoint: str = "", log_level: str = "INFO",
          log_format: str | None = None) -> None:
    """Install the tracer provider (once per process) and configure logging.

    exporter: `none`, `console`, `otlp` (several: comma-separated); None: the SDK's own variables —
    `OTEL_TRACES_EXPORTER`, else `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else none; `OTEL_SDK_DISABLED=true` turns it off.
    otlp_endpoint: empty leaves the endpoint, TLS (`OTEL_EXPORTER_OTLP_INSECURE`, `..._CERTIFICATE`)
    and headers to the OTLP exporter's own `OTEL_EXPORTER_OTLP_*` variables.
    The resource's `service.name` is `service_name` unless `OTEL_SERVICE_NAME` (or
    `OTEL_RESOURCE_ATTRIBUTES`) names one; `cnc.process` always carries `service_name`.
    log_format: `text` or `json` (None: `CNC_LOG_FORMAT`, else text); see `configure_logging`."""
    global _configured
    configure_logging(log_level, log_format, service_name)
    if _configured:
        return
    attributes = {"cnc.process": service_name, "service.namespace": "cncbrain"}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = service_name
    provider = _Provider(resource=Resource.create(attributes))
    for name in exporter_names(exporter):
        span_exporter: SpanExporter
        if name == "console":
            span_exporter = ConsoleSpanExporter()
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint or None)
        else:
            raise UsageError(f"trace exporter {name!r} (OTEL_TRACES_EXPORTER or the process's OTEL_EXPORTER "
                             "setting): expected none, console or otlp")
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _tracers.clear()
    _configured = True


def setup_process(process: str, settings: Any) -> str | None:
    """What every long-running process of the brain does first: tracing and logging from its
    settings (a `CncSettings`), then its `/metrics` endpoint. Returns that endpoint's URL."""
    from cncbrain import metrics

    setup(process, settings.otel_exporter, settings.otlp_endpoint, settings.log_level, settings.log_format)
    return metrics.serve(process)


def exporter_names(exporter: str | None) -> list[str]:
    """The span exporters to install (see `setup`)."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    if exporter is None:
        exporter = env.get("OTEL_TRACES_EXPORTER") or (
            "otlp" if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") else "none")
    names = [n.strip().lower() for n in exporter.split(",") if n.strip()]
    return [n for n in dict.fromkeys(names) if n != "none"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, and the trace and span ids of
    the span current when the record was made (empty outside any span); `exc_info` when there is one."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = trace.format_trace_id(ctx.trace_id)
            out["span_id"] = trace.format_span_id(ctx.span_id)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


JsonFormatter.converter = time.gmtime
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


def configure_logging(level: str = "INFO", log_format: str | None = None, process: str = "cncbrain") -> None:
    """Root logging to stderr: `text` (one readable line) or `json` (`JsonFormatter`). `log_format`
    None: `CNC_LOG_FORMAT`, else text. A bad name is refused with the accepted ones."""
    chosen = (log_format or os.environ.get("CNC_LOG_FORMAT") or "text").strip().lower()
    if chosen not in LOG_FORMATS:
        raise UsageError(f"log format {chosen!r}: expected one of {', '.join(LOG_FORMATS)} (CNC_LOG_FORMAT, --log-format)")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_cnc", False)), None)
    if handler is None:
        if root.handlers:  # someone configured logging first (pytest's capture): theirs, untouched
            return
        handler = logging.StreamHandler()
        handler._cnc = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter(process) if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(getattr(logging, level, logging.INFO))


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
