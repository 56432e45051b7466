"""The event bus: NATS connection (`Bus`), subject registry (`subjects`), event envelope
(`envelope`), JetStream streams and KV buckets (`streams`)."""

from cncbrain.bus import subjects
from cncbrain.bus.connection import Bus
from cncbrain.bus.envelope import EnvelopeError, Event
from cncbrain.bus.streams import KV_SITES, KV_WORKLOADS

__all__ = ["Bus", "Event", "EnvelopeError", "KV_SITES", "KV_WORKLOADS", "subjects"]
