"""The event envelope: protobuf payload plus headers (type id, event id, W3C traceparent).

Headers:
- `Cnc-Type`      protobuf full name of the payload, versioned by package (`cnc.scheduler.v1.Offer`)
- `Cnc-Event-Id`  unique id of the event; consumers drop repeats (idempotency)
- `Nats-Msg-Id`   same id, so JetStream drops a re-published duplicate inside its window
- `traceparent`   W3C trace context of the publisher's span
- `Cnc-Sent-At`   publisher's wall clock, unix seconds (for latency figures)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from cncbrain import telemetry
from cncbrain.errors import InvalidArgument

TYPE = "Cnc-Type"
EVENT_ID = "Cnc-Event-Id"
MSG_ID = "Nats-Msg-Id"
SENT_AT = "Cnc-Sent-At"
TRACEPARENT = "traceparent"
_bits = random.getrandbits  # reseeded in forked children by the random module itself
M = TypeVar("M", bound=Message)


class EnvelopeError(InvalidArgument):
    """An event that cannot be decoded: missing headers, unknown or unexpected type, bad bytes."""


@dataclass(frozen=True)
class Event(Generic[M]):
    """One decoded event; `payload` is the message its subject carries (`Subject[M]` → `Event[M]`)."""

    subject: str
    type_id: str
    event_id: str
    payload: M
    headers: dict[str, str]
    params: dict[str, str]
    """Tokens taken from the subject (`site`, `workload`)."""

    @property
    def traceparent(self) -> str:
        return self.headers.get(TRACEPARENT, "")


def new_event_id() -> str:
    """128 random bits as 32 hex digits (as uuid4().hex, without its syscall and object)."""
    return f"{_bits(128):032x}"


def make_headers(message: Message, event_id: str | None = None) -> dict[str, str]:
    eid = event_id or new_event_id()
    headers = {TYPE: message.DESCRIPTOR.full_name, EVENT_ID: eid, MSG_ID: eid, SENT_AT: f"{time.time():.6f}"}
    telemetry.inject(headers)
    return headers


def decode(
    subject: str, data: bytes, headers: dict[str, str] | None, expected: type[M], params: dict[str, str]
) -> Event[M]:
    headers = dict(headers or {})
    type_id = headers.get(TYPE)
    if not type_id:
        raise EnvelopeError(f"no {TYPE} header")
    if type_id != expected.DESCRIPTOR.full_name:
        raise EnvelopeError(f"unexpected type {type_id!r} on {subject} (wants {expected.DESCRIPTOR.full_name})")
    event_id = headers.get(EVENT_ID)
    if not event_id:
        raise EnvelopeError(f"no {EVENT_ID} header")
    payload = expected()
    try:
        payload.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise EnvelopeError(f"payload is not a valid {type_id}: {exc}") from None
    return Event(subject, type_id, event_id, payload, headers, params)
