"""The one registry of the bus: every NATS subject and every JetStream stream of the brain is
declared here (nowhere else, and not as a side effect of importing a block's module), so any process
— `cncbrain watch`, the permission table, the tests — sees all of them.

Shape: `cnc.<block>.<event>[.<key>]`, where the key is a site id or a workload id. Site agents'
own events put the site first (`cnc.site.<site_id>.<event>`) so one wildcard follows one site.
Each subject names its protobuf message (decoding checks the type header against it) and, when
its events must survive restarts, the JetStream stream that stores it (`STREAMS`).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus.streams import DAY_S, StreamSpec
from cncbrain.errors import InvalidArgument
from cncbrain.limits import quote

TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A site id, workload id or any other token put into a subject."""
M = TypeVar("M", bound=Message)
BLOCKS = ("site", "perception", "scheduler", "adaptation", "governance", "emulator", "deadletter")


class SubjectError(InvalidArgument):
    """A subject or one of its tokens is malformed."""


def check_token(value: str, what: str = "token") -> str:
    if not isinstance(value, str) or not TOKEN.match(value):
        raise SubjectError(f"{what} {quote(value)} is not a valid subject token ([A-Za-z0-9_-], 1..64 chars)")
    return value


@dataclass(frozen=True)
class Subject(Generic[M]):
    """One kind of event: its subject template, payload type and (optional) stream."""

    template: str
    """e.g. `cnc.scheduler.placement.{site}`; placeholders are filled by `build`."""
    message: type[M]
    """Protobuf payload; the `Cnc-Type` header carries its full name."""
    stream: str | None = None
    """JetStream stream that stores it; None means core NATS (fire and forget)."""
    doc: str = ""
    params: tuple[str, ...] = field(init=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)
        object.__setattr__(self, "params", names)
        pattern = re.escape(self.template)
        for p in names:
            pattern = pattern.replace(re.escape("{" + p + "}"), f"(?P<{p}>[A-Za-z0-9_-]+)")
        object.__setattr__(self, "_pattern", re.compile(pattern))  # match() runs on every event
        parts = self.template.split(".")
        if parts[0] != "cnc" or parts[1] not in BLOCKS or len(parts) < 3:
            raise SubjectError(f"subject {self.template!r} is not cnc.<block>.<event>[.<key>]")

    @property
    def type_id(self) -> str:
        return self.message.DESCRIPTOR.full_name

    @property
    def durable(self) -> bool:
        return self.stream is not None

    def build(self, **params: str) -> str:
        if not params and not self.params:
            return self.template
        if len(params) != len(self.params) or any(p not in params for p in self.params):
            raise SubjectError(f"{self.template} needs {self.params}, got {tuple(params)}")
        for k, v in params.items():
            check_token(v, k)
        return self.template.format(**params)

    def wildcard(self, **params: str) -> str:
        """Subject filter; parameters not given become `*`."""
        return self.template.format(**{p: check_token(params[p], p) if p in params else "*" for p in self.params})

    def match(self, subject: str) -> dict[str, str] | None:
        m = self._pattern.fullmatch(subject)
        return m.groupdict() if m else None


# --- streams: what JetStream keeps ----------------------------------------------------------------
WORKLOADS_STREAM = StreamSpec("CNC_WORKLOADS", ("cnc.scheduler.workload.>",),
                              doc="lifecycle of every workload (watch replays it)")
PLACEMENTS_STREAM = StreamSpec("CNC_PLACEMENTS", ("cnc.scheduler.placement.>",), doc="committed placements per site")
SITES_STREAM = StreamSpec("CNC_SITES", ("cnc.site.*.registered", "cnc.site.*.applied", "cnc.perception.site_state.>"),
                          doc="site lifecycle: registrations, executors' results, down/up")
ADAPTATION_STREAM = StreamSpec("CNC_ADAPTATION", ("cnc.adaptation.action",), max_age_s=30 * DAY_S,
                               doc="adaptation's actions with their reasons")
LEDGER_STREAM = StreamSpec("CNC_LEDGER", ("cnc.governance.ledger",), max_age_s=0, at_connect=False,
                           doc="governance's audit ledger, kept for ever; created by governance alone, which "
                               "also denies deleting from it (`services.governance.ledger_store`)")
DEADLETTER_STREAM = StreamSpec("CNC_DEADLETTER", ("cnc.deadletter.>",), max_age_s=30 * DAY_S,
                               doc="events a consumer could not decode or handle")
STREAMS: tuple[StreamSpec, ...] = (WORKLOADS_STREAM, PLACEMENTS_STREAM, SITES_STREAM, ADAPTATION_STREAM,
                                   LEDGER_STREAM, DEADLETTER_STREAM)

# --- site agents -------------------------------------------------------------------------------
SITE_REGISTERED = Subject("cnc.site.{site}.registered", site_pb.SiteRegistered, SITES_STREAM.name, "a site and its inventory")
SITE_HEARTBEAT = Subject("cnc.site.{site}.heartbeat", site_pb.Heartbeat, None, "agent liveness")
SITE_TELEMETRY = Subject("cnc.site.{site}.telemetry", site_pb.SiteTelemetry, None, "per-tick measurements")
SITE_PROPOSAL = Subject("cnc.site.{site}.proposal", site_pb.Proposal, None, "an agent's SCALE proposal to the scheduler")
SITE_ANSWER = Subject("cnc.site.{site}.answer", site_pb.OfferAnswer, None, "a site's answers to one offer round")
SITE_ANSWERS = Subject("cnc.site.{agent}.answers", site_pb.OfferAnswers, None,
                       "the answers of an agent process's sites to one offer round (agent = the process's id)")
SITE_APPLIED = Subject("cnc.site.{site}.applied", site_pb.PlacementApplied, SITES_STREAM.name, "executor result")
# --- perception --------------------------------------------------------------------------------
PERCEPTION_SNAPSHOT = Subject("cnc.perception.snapshot", ppb.Snapshot, None, "the pool, every tick")
PERCEPTION_SITE_STATE = Subject(
    "cnc.perception.site_state.{site}", ppb.SiteStateChanged, SITES_STREAM.name, "site down / up"
)
# --- scheduler ---------------------------------------------------------------------------------
SCHEDULER_OFFER = Subject("cnc.scheduler.offer", spb.OfferRound, None, "work offered to the site agents, per round")
SCHEDULER_PLACEMENT = Subject(
    "cnc.scheduler.placement.{site}", spb.PlacementCommitted, PLACEMENTS_STREAM.name, "committed placement"
)
SCHEDULER_WORKLOAD = Subject(
    "cnc.scheduler.workload.{workload}", spb.WorkloadEvent, WORKLOADS_STREAM.name, "workload lifecycle"
)
# --- adaptation ----------------------------------------------------------------------------------
ADAPTATION_ACTION = Subject("cnc.adaptation.action", apb.AdaptationAction, ADAPTATION_STREAM.name,
                            "adaptation actions with their reasons")
# --- governance ----------------------------------------------------------------------------------
GOVERNANCE_LEDGER = Subject("cnc.governance.ledger", gpb.LedgerBlock, LEDGER_STREAM.name, "audit ledger blocks")
# --- emulator (stands in for a site's hardware) ---------------------------------------------------
EMULATOR_INVENTORY = Subject("cnc.emulator.inventory.{site}", site_pb.EmulatorInventoryRequest, None, "request/reply")
EMULATOR_APPLY = Subject("cnc.emulator.apply.{site}", spb.PlacementCommitted, None, "request/reply")
EMULATOR_STATE = Subject("cnc.emulator.state.{site}", site_pb.SiteTelemetry, None, "emulated site, every tick")
EMULATOR_FAIL = Subject("cnc.emulator.fail.{site}", site_pb.EmulatorFailSite, None, "inject a site outage")

DEADLETTER_TEMPLATE = "cnc.deadletter.{consumer}"
"""Where a consumer moves an event it cannot decode or handle (`DEADLETTER_STREAM`); the event keeps
its headers (its type among them)."""

ALL: tuple[Subject[Any], ...] = tuple(v for v in list(globals().values()) if isinstance(v, Subject))
BY_TYPE: dict[str, type[Message]] = {s.type_id: s.message for s in ALL}


def deadletter(consumer: str) -> str:
    return DEADLETTER_TEMPLATE.format(consumer=check_token(consumer, "consumer"))


def lookup(subject: str) -> tuple[Subject[Any], dict[str, str]] | None:
    for spec in ALL:
        params = spec.match(subject)
        if params is not None:
            return spec, params
    return None
