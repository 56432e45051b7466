"""`Bus`: the one NATS connection of a process — reconnecting, typed publish/subscribe,
durable JetStream consumers with idempotency and a dead-letter path, KV buckets.

A handler receives a decoded `Event` and may return a protobuf message (sent as the reply of a
request). An event that cannot be decoded (no/unknown type header, garbled bytes) or whose handler
keeps failing is logged, counted and moved to `cnc.deadletter.<consumer>`; the consumer goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from cncbrain import metrics, telemetry
from cncbrain.bus import envelope, streams, subjects
from cncbrain.bus.credentials import client_options
from cncbrain.bus.envelope import EnvelopeError, Event
from cncbrain.bus.permissions import may_create
from cncbrain.bus.subjects import Subject, check_token, deadletter
from cncbrain.errors import CncError
from cncbrain.settings import BusSettings, load_settings

log = logging.getLogger(__name__)


class _QuietTlsEof(logging.Filter):
    """nats-py starts TLS on a plain stream (after the server's INFO), whose protocol then answers
    the peer's close with a return value asyncio's TLS layer ignores, and says so at WARNING on
    every closed TLS connection. Harmless; dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsEof())

M = TypeVar("M", bound=Message)
Handler = Callable[[Event[M]], Awaitable[Message | None]]

# Bursts (a deploy storm, a snapshot fan-out) must queue, not be dropped as slow-consumer.
PENDING_MSGS_LIMIT = 1_000_000
PENDING_BYTES_LIMIT = 512 * 1024 * 1024
MAX_DELIVER = 5
LAG_POLL_S = 5.0
"""How often the lag of this process's durable consumers is read for `cnc_bus_consumer_pending`."""
RETRYABLE = (
    # the connection is away (a restart, a failover to another node) or backed up meanwhile
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    nats.errors.UnexpectedEOF,
    # JetStream between leaders: no stream leader answered yet, 503, a stalled async publish, 5xx
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.TooManyStalledMsgsError,
    nats.js.errors.FetchTimeoutError,
    nats.js.errors.ServerError,
    asyncio.TimeoutError,
)
"""What `Bus.retrying` rides out, by name: every nats-py error a NATS restart or a JetStream
leader election raises (tests/service/test_bus.py checks each)."""
JS_TIMEOUT_S = 5.0
"""A JetStream request (KV read or write, stream info) unanswered for this long is given up (and
retried by `retrying`): a request sent just as NATS went away gets no reply at all. Shorter (1.5 s
was tried) cuts that wait, but a loaded machine's JetStream then misses it at start-up too."""
SAY_EVERY_S = 3.0
"""How often a process that cannot reach NATS says so (the URL and why)."""
T = TypeVar("T")


class _Seen:
    """Bounded memory of event ids already handled by one consumer."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self.ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        """True when the id is new."""
        if event_id in self.ids:
            return False
        self.ids[event_id] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)
        return True


class Bus:
    """A process's connection to NATS. Build with `await Bus.connect(url, name)`."""

    def __init__(self, nc: Client, js: JetStreamContext, name: str, identity: str | None = None) -> None:
        self.nc = nc
        self.js = js
        self.name = name
        self.identity = identity
        """The NATS identity this connection authenticated as (None: no credentials)."""
        # Replicas of every stream and KV bucket this process creates: 3 on a 3-node cluster.
        self.replicas = load_settings(BusSettings).replicas
        self.counters: Counter[str] = Counter()
        self._kv: dict[str, KeyValue] = {}
        self._subs: list[Any] = []
        self.closing = False
        self._inflight: set[asyncio.Future[Any]] = set()
        self._dropped: set[asyncio.Future[Any]] = set()
        self.on_reconnect: list[Callable[[], None]] = []
        """Called after each reconnection (e.g. perception: heartbeats it could not hear are no sign)."""
        self._durables: dict[str, str] = {}
        """Durable consumers of this process: name -> stream (their lag is exported)."""
        self._lag_task: asyncio.Task[None] | None = None
        metrics.track_bus(self)

    # --- connection ---------------------------------------------------------------------------
    @classmethod
    async def connect(cls, url: str, name: str, *, ensure: bool = True, timeout_s: float | None = None,
                      identity: str | None = None, secrets_dir: Path | None = None,
                      tls_ca: Path | None = None) -> Bus:
        """Connect as `identity` (a role of `cncbrain.bus.permissions`: `scheduler`, `site-<id>`, …)
        with its nkey from `secrets_dir` (default `CNC_SECRETS_DIR`); without a secrets folder, or
        without an identity, the connection carries no credentials (a server without auth). With a
        TLS CA (`tls_ca`, default `CNC_NATS_TLS_CA`) the connection is TLS, verified against it
        (`connect_options`).

        Until NATS answers (for `timeout_s`, default `CNC_NATS_CONNECT_TIMEOUT_S`), and whenever the
        connection is lost later, the process logs the URL and why every few seconds."""
        holder: dict[str, Bus] = {}
        bus_settings = load_settings(BusSettings)
        timeout_s = bus_settings.connect_timeout_s if timeout_s is None else timeout_s
        said = {"at": 0.0, "lost": 0.0}
        auth = connect_options(identity, secrets_dir, tls_ca, bus_settings)
        if "nkeys_seed_str" not in auth:
            identity = None
        tls = "tls" in auth
        ca = tls_ca or bus_settings.tls_ca

        async def on_error(exc: Exception) -> None:
            bus = holder.get("bus")
            if bus is not None and (bus.closing or bus.nc.is_connected):
                log.debug("nats %s: %s", name, exc)
                return
            if time.monotonic() - said["at"] >= SAY_EVERY_S:  # each failed reconnect attempt lands here
                said["at"] = time.monotonic()
                log.warning("%s: cannot reach NATS at %s (%s); still trying", name, url, _why(exc))

        async def on_disconnected() -> None:
            bus = holder.get("bus")
            if bus is not None and bus.closing:
                return
            said["lost"] = time.monotonic()
            log.warning("%s: disconnected from NATS at %s, reconnecting", name, url)
            if bus is not None:
                bus.counters["disconnects"] += 1
                bus._drop_inflight()

        async def on_reconnected() -> None:
            bus = holder.get("bus")
            if tls and not uses_tls(nc):
                log.error("%s: the NATS server at %s does not use TLS; closing the connection", name,
                          nc.connected_url.netloc if nc.connected_url else url)
                await nc.close()
                return
            where = bus.nc.connected_url.netloc if bus is not None and bus.nc.connected_url else url
            away = f" after {time.monotonic() - said['lost']:.1f} s" if said["lost"] else ""
            log.warning("%s: reconnected to NATS at %s%s", name, where, away)
            for hook in bus.on_reconnect if bus is not None else ():
                try:
                    hook()
                except Exception:
                    log.exception("%s: a reconnect hook failed", name)

        # nats-py retries the first connection for ever too (max_reconnect_attempts=-1), each
        # failed attempt reported to `on_error`: the deadline is ours, a refusal ends it at once.
        nc = nats.NATS()
        refused: dict[str, BaseException] = {}

        async def on_connect_error(exc: Exception) -> None:
            # a refused key or a certificate that is not the CA's: no retry will change that
            if ("authorization" in str(exc).lower() or isinstance(exc, ssl.SSLCertVerificationError)) \
                    and not nc.is_connected:
                refused["exc"] = exc
                attempt.cancel()
            await on_error(exc)

        attempt = asyncio.ensure_future(nc.connect(
            servers=[u.strip() for u in url.split(",")],
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds; nats-py annotates int, sleeps a float
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_connect_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            **auth,
        ))
        try:
            await asyncio.wait_for(asyncio.shield(attempt), timeout_s or None)
        except (TimeoutError, asyncio.CancelledError) as exc:
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await nc.close()
            if "exc" in refused:
                if isinstance(refused["exc"], ssl.SSLCertVerificationError):
                    against = f"the CA {ca}" if ca else "the system's CAs (set CNC_NATS_TLS_CA to the brain's CA)"
                    raise CncError(f"NATS at {url} requires TLS and its certificate does not verify against "
                                   f"{against}: {refused['exc'].verify_message}") from None
                who = f"as {identity!r}" if identity else "without credentials"
                raise CncError(f"NATS at {url} refused the connection {who}: {refused['exc']}") from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            last = getattr(nc, "_err", None)
            raise CncError(f"cannot reach NATS at {url} within {timeout_s:g} s"
                           + (f": {_why(last)}" if last else "")) from None
        if tls and not uses_tls(nc):  # nats-py goes plain when the server does not ask for TLS
            with contextlib.suppress(Exception):
                await nc.close()
            raise CncError(f"NATS at {url} does not use TLS, but this process has a TLS CA "
                           f"({ca}): refusing a plain connection")
        bus = cls(nc, nc.jetstream(timeout=JS_TIMEOUT_S), name, identity)
        holder["bus"] = bus
        if ensure:
            await bus.ensure_streams()
        return bus

    async def ensure_streams(self) -> None:
        """Create every stream and KV bucket this identity owns (all of them without auth, or as
        admin, which also updates a stream whose configuration changed); safe from every process.
        The others are their owners' to create: using one waits for it (`kv`, `subscribe`)."""
        for spec in subjects.STREAMS:
            if not spec.at_connect or not may_create(self.identity, spec.name):
                continue
            config = streams.stream_config(spec, self.replicas)
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                if self.identity is not None and self.identity != "admin":
                    log.warning("%s: stream %s exists with another configuration; the admin identity "
                                "updates it (`cncbrain up` does at start)", self.name, spec.name)
                    continue
                await self.js.update_stream(config)
        for bucket in streams.BUCKETS:
            if may_create(self.identity, f"KV_{bucket}"):
                await self.kv(bucket)

    async def kv(self, bucket: str, wait_s: float = 30.0) -> KeyValue:
        """The bucket, created when missing if this identity owns it, else waited for (`wait_s`)."""
        if bucket not in self._kv:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    self._kv[bucket] = await self.js.key_value(bucket)
                    break
                except nats.js.errors.BucketNotFoundError:
                    if may_create(self.identity, f"KV_{bucket}"):
                        self._kv[bucket] = await self.js.create_key_value(api.KeyValueConfig(
                            bucket=bucket, history=1, storage=api.StorageType.FILE, replicas=self.replicas))
                        break
                    if time.monotonic() > deadline:
                        raise CncError(f"KV bucket {bucket} does not exist (its owner creates it at start)") from None
                    await asyncio.sleep(0.2)
        return self._kv[bucket]

    async def kv_items(self, bucket: str) -> dict[str, tuple[bytes, int]]:
        """Every live key of a KV bucket: key → (value, revision), read through a pull consumer on
        the bucket's stream (last entry per key; deleted and purged keys left out).

        Not nats-py's `KeyValue.keys()`: its push watcher ends the listing when the consumer-info
        reply overtakes the entries already pushed, which under load reports a full bucket as
        empty (nats-io/nats.py#842) — a restarted scheduler would recover no workloads."""
        prefix = f"$KV.{bucket}."
        await self.kv(bucket)  # the bucket exists
        items: dict[str, tuple[bytes, int]] = {}
        for msg in await self._read_stream(f"KV_{bucket}", f"{prefix}>", api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, ack_policy=api.AckPolicy.NONE,
                inactive_threshold=60.0)):
            key = msg.subject[len(prefix):]
            headers = msg.headers or {}
            if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
                items.pop(key, None)
            else:
                items[key] = (msg.data, msg.metadata.sequence.stream)
        return items

    async def events_since(self, spec: Subject[M], since_s: float, *, consumer: str | None = None,
                           **params: str) -> list[Event[M]]:
        """The events of a JetStream subject stored since `since_s` (unix seconds, the server's
        clock), oldest first, read through a pull consumer (as `kv_items`; named `consumer` when
        given, for an identity that may create only consumers of known names). Undecodable ones are
        skipped and logged."""
        assert spec.stream, f"{spec.template} is not kept in a stream"
        start = datetime.datetime.fromtimestamp(max(since_s, 0.0), datetime.UTC)
        out: list[Event[M]] = []
        for msg in await self._read_stream(spec.stream, spec.wildcard(**params), api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start,
                ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0), name=consumer):
            try:
                out.append(envelope.decode(msg.subject, msg.data, msg.headers, spec.message, spec.match(msg.subject) or {}))
            except EnvelopeError as exc:
                log.warning("skipped an undecodable event on %s: %s", msg.subject, exc)
        return out

    async def _read_stream(self, stream: str, subject: str, config: api.ConsumerConfig,
                           name: str | None = None) -> list[Msg]:
        """Every message a fresh pull consumer (`config`, filtered on `subject`, named `name` or
        by the client) has pending, read to the end in batches; the consumer is deleted after."""
        if name is not None:  # one left by a reader that died would resume where it stopped
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(stream, name)
        sub = await self.js.pull_subscribe(subject, durable=name, stream=stream, config=config)
        out: list[Msg] = []
        name = None
        try:
            info = await sub.consumer_info()
            name, remaining = info.name, info.num_pending or 0
            while remaining > 0:
                for msg in await sub.fetch(min(remaining, 1000), timeout=10.0):
                    remaining = msg.metadata.num_pending
                    out.append(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name is not None:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(stream, name)
        return out

    async def _poll_lag(self) -> None:
        """Export the lag of this process's durable consumers every `LAG_POLL_S` seconds."""
        while not self.closing:
            for consumer, stream in list(self._durables.items()):
                try:
                    info = await self.js.consumer_info(stream, consumer, timeout=2.0)
                except Exception:  # NATS away or the consumer deleted: try again next time
                    continue
                metrics.CONSUMER_PENDING.labels(self.name, consumer).set(info.num_pending or 0)
                metrics.CONSUMER_ACK_PENDING.labels(self.name, consumer).set(info.num_ack_pending or 0)
            await asyncio.sleep(LAG_POLL_S)

    async def close(self) -> None:
        self.closing = True
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lag_task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def retrying(self, op: Callable[[], Awaitable[T]], what: str, timeout_s: float = 30.0) -> T:
        """Run `op` until it succeeds or `timeout_s` passes; rides out a NATS restart.

        A request in flight when the connection drops gets no reply (it went to the old socket, or
        its reply did): the drop cancels it (`_drop_inflight`) and it is sent again once connected,
        instead of waiting out its whole timeout. `op` must be safe to repeat (the bus's writes
        are: compare-and-set, deduplicated ids)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            # While reconnecting, nats-py would buffer the request and wait out its whole timeout
            # for a reply that never comes: wait for the connection first.
            while not self.nc.is_connected and not self.nc.is_closed and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            attempt = asyncio.ensure_future(op())
            self._inflight.add(attempt)
            try:
                return await attempt
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if attempt not in self._dropped or (me is not None and me.cancelling()):
                    raise
                self.counters["retries_after_drop"] += 1  # the connection dropped under it: again
            except RETRYABLE as exc:
                if time.monotonic() > deadline:
                    raise CncError(f"{what}: NATS unavailable for {timeout_s:.0f} s ({exc!r})") from None
                self.counters["retries"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            finally:
                self._inflight.discard(attempt)
                self._dropped.discard(attempt)

    def _drop_inflight(self) -> None:
        """The connection dropped: cancel the `retrying` requests in flight (see there)."""
        for attempt in list(self._inflight):
            if not attempt.done():
                self._dropped.add(attempt)
                attempt.cancel()

    # --- publishing ---------------------------------------------------------------------------
    async def publish(
        self, spec: Subject[M], message: M, *, event_id: str | None = None, timeout_s: float = 30.0,
        span: bool = True, **params: str
    ) -> str:
        """Publish an event; to JetStream (acknowledged, deduplicated by event id) when the subject
        has a stream, else core NATS. Returns the event id.

        span=False: no PRODUCER span of its own; the event carries the current span's traceparent
        (an answer sent from inside the consumer span of what it answers — the hot offer path)."""
        if not isinstance(message, spec.message):
            raise TypeError(f"{spec.template} carries {spec.type_id}, not {type(message).__name__}")
        subject = spec.build(**params)
        if span:
            with telemetry.span("cncbrain.bus", f"send {spec.template}", kind=SpanKind.PRODUCER):
                headers = envelope.make_headers(message, event_id)
        else:
            headers = envelope.make_headers(message, event_id)
        data = message.SerializeToString()
        if spec.stream:
            await self.retrying(
                lambda: self.js.publish(subject, data, headers=headers, stream=spec.stream, timeout=2.0),
                f"publish {subject}",
                timeout_s,
            )
        else:
            await self.nc.publish(subject, data, headers=headers)
        self.counters["published"] += 1
        return headers[envelope.EVENT_ID]

    async def request(self, spec: Subject[Any], message: Message, reply_type: type[M], timeout_s: float = 2.0, **params: str) -> M:
        subject = spec.build(**params)
        headers = envelope.make_headers(message)
        msg = await self.nc.request(subject, message.SerializeToString(), timeout=timeout_s, headers=headers)
        event = envelope.decode(subject, msg.data, msg.headers, reply_type, {})
        return event.payload

    # --- consuming ----------------------------------------------------------------------------
    async def subscribe(
        self,
        spec: Subject[M],
        handler: Handler[M],
        *,
        consumer: str,
        durable: bool = False,
        replay: bool = False,
        queue: str | None = None,
        **params: str,
    ) -> Any:
        """Subscribe `handler` to `spec` (parameters not given are wildcards).

        consumer: name used for the dead-letter subject, metrics and, with durable=True, the
        JetStream durable consumer (which resumes where it stopped after a restart).
        replay: an ephemeral ordered consumer that replays the stream from its start (watch).
        """
        check_token(consumer, "consumer")
        subject = spec.wildcard(**params)
        seen = _Seen()
        stream = spec.stream if durable or replay else None
        is_js = stream is not None
        sub: Any

        async def dispatch(msg: Msg) -> None:
            self.counters[f"{consumer}.received"] += 1
            found = spec.match(msg.subject) or {}
            try:
                event = envelope.decode(msg.subject, msg.data, msg.headers, spec.message, found)
            except EnvelopeError as exc:
                await self._dead_letter(consumer, msg, f"undecodable: {exc}")
                if is_js and durable:
                    await msg.ack()
                return
            if not seen.add(event.event_id):
                self.counters[f"{consumer}.duplicates"] += 1
                if is_js and durable:
                    await msg.ack()
                return
            try:
                with telemetry.span("cncbrain.bus", f"{consumer} {spec.template}",
                                    context=telemetry.extract(event.headers), kind=SpanKind.CONSUMER):
                    reply = await handler(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler bug must not stop the consumer
                self.counters[f"{consumer}.handler_errors"] += 1
                log.exception("%s: handler failed on %s (%s)", consumer, msg.subject, event.event_id)
                seen.ids.pop(event.event_id, None)
                if is_js and durable:
                    delivered = msg.metadata.num_delivered if msg.metadata else MAX_DELIVER
                    if delivered >= MAX_DELIVER:
                        await self._dead_letter(consumer, msg, f"handler failed {delivered} times: {exc!r}")
                        await msg.ack()
                    else:
                        await msg.nak(delay=0.2 * delivered)
                return
            if is_js and durable:
                await msg.ack()
            elif reply is not None and msg.reply:
                await self.nc.publish(msg.reply, reply.SerializeToString(), headers=envelope.make_headers(reply))
            self.counters[f"{consumer}.handled"] += 1

        if stream is not None and durable:
            config = api.ConsumerConfig(
                name=consumer,  # named: the create request's subject carries the filter (permissions)
                durable_name=consumer,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_deliver=MAX_DELIVER,
                deliver_policy=api.DeliverPolicy.ALL,
                max_ack_pending=20_000,
            )
            sub = await self._when_stream(stream, lambda: self.js.subscribe(
                subject,
                durable=consumer,
                stream=stream,
                config=config,
                cb=dispatch,
                manual_ack=True,
                pending_msgs_limit=PENDING_MSGS_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT,
            ))
            self._durables[consumer] = stream
            if self._lag_task is None:
                self._lag_task = asyncio.create_task(self._poll_lag(), name=f"{self.name}-consumer-lag")
        elif stream is not None:
            sub = await self._when_stream(stream, lambda: self.js.subscribe(
                subject,
                stream=stream,
                cb=dispatch,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                pending_msgs_limit=PENDING_MSGS_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT,
            ))
        else:
            sub = await self.nc.subscribe(
                subject,
                queue=queue or "",
                cb=dispatch,
                pending_msgs_limit=PENDING_MSGS_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT,
            )
        self._subs.append(sub)
        return sub

    async def follow(self, spec: Subject[M], handler: Callable[[Event[M], int], Awaitable[None]], *,
                     after_sequence: int = 0, **params: str) -> Any:
        """Every event of a JetStream subject in stream order, from after `after_sequence` (0: the
        oldest kept), then live; `handler(event, stream_sequence)`. An ordered consumer: nothing is
        skipped or repeated, and it is gone when unsubscribed. Undecodable events are skipped."""
        assert spec.stream, f"{spec.template} is not kept in a stream"

        async def on(msg: Msg) -> None:
            try:
                event = envelope.decode(msg.subject, msg.data, msg.headers, spec.message, spec.match(msg.subject) or {})
            except EnvelopeError as exc:
                log.warning("skipped an undecodable event on %s: %s", msg.subject, exc)
                return
            await handler(event, msg.metadata.sequence.stream)

        config = (api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_sequence + 1)
                  if after_sequence > 0 else api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL))
        sub = await self._when_stream(spec.stream, lambda: self.js.subscribe(
            spec.wildcard(**params), stream=spec.stream, cb=on, ordered_consumer=True, config=config,
            pending_msgs_limit=PENDING_MSGS_LIMIT, pending_bytes_limit=PENDING_BYTES_LIMIT))
        self._subs.append(sub)
        return sub

    async def _when_stream(self, stream: str, op: Callable[[], Awaitable[T]], wait_s: float = 30.0) -> T:
        """Run `op` (a subscription on `stream`), waiting up to `wait_s` for the stream's owner to
        have created it (services start in any order)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await op()
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise CncError(f"stream {stream} does not exist (its owner creates it at start)") from None
                await asyncio.sleep(0.2)

    async def unsubscribe(self, sub: Any) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    async def delete_durable(self, spec: Subject[Any], consumer: str) -> None:
        """Forget a durable consumer's position (its next subscribe replays the stream)."""
        assert spec.stream
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(spec.stream, consumer)

    async def _dead_letter(self, consumer: str, msg: Msg, reason: str) -> None:
        self.counters[f"{consumer}.dead_lettered"] += 1
        log.error("%s: moved event on %s to dead letter: %s", consumer, msg.subject, reason)
        headers = {k: v for k, v in (msg.headers or {}).items() if k != envelope.MSG_ID}
        headers.update({"Cnc-Dead-Subject": msg.subject, "Cnc-Dead-Reason": reason[:500]})
        try:
            await self.retrying(
                lambda: self.js.publish(deadletter(consumer), msg.data, headers=headers, timeout=2.0),
                "dead letter",
                timeout_s=5.0,
            )
        except CncError:
            log.error("%s: dead-letter publish failed too; event dropped", consumer)


def connect_options(identity: str | None, secrets_dir: Path | None = None, tls_ca: Path | None = None,
                    settings: BusSettings | None = None) -> dict[str, Any]:
    """nats-py `connect` options of a process: its nkey (as `identity`, from `secrets_dir`, default
    `CNC_SECRETS_DIR`; none without an identity or a folder) and, with a TLS CA (`tls_ca`, default
    `CNC_NATS_TLS_CA`), an SSL context that trusts only that CA and checks the server's name, plus
    the client certificate of `CNC_NATS_TLS_CERT`/`_KEY` where set."""
    from cncbrain.certs import nats_tls_context

    settings = settings or load_settings(BusSettings)
    options: dict[str, Any] = {}
    folder = secrets_dir or settings.secrets_dir
    if identity is not None and folder is not None:
        options.update(client_options(identity, folder))
    ca = tls_ca or settings.tls_ca
    if ca is not None:
        options["tls"] = nats_tls_context(ca, settings.tls_cert, settings.tls_key)
    return options


def uses_tls(nc: Client) -> bool:
    """Whether the connection went TLS: nats-py upgrades exactly when the server's INFO requires it
    (there is no public accessor for the INFO)."""
    return bool(getattr(nc, "_server_info", {}).get("tls_required"))


def _why(exc: BaseException) -> str:
    """An exception as a short reason (nats-py's NoServersError says nothing of the cause)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, nats.errors.NoServersError):
        return "no server answered"
    return text if len(text) <= 200 else text[:200] + "…"
